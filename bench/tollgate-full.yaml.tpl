# key-auth + the sliding-window limit (node store) + metrics + a call record to SQLite for
# every call (the default `logs` section: records and rollups into `storage`).
version: 1
gateway: {listen: "127.0.0.1:@PORT@", workers: 1}
admin: {listen: null}
storage: "sqlite:///@SYSDIR@/tollgate.db"
upstreams:
  - name: mock
    targets: [{url: "http://127.0.0.1:@MOCK_PORT@"}]
services:
  - name: plain
    upstream: mock
    routes:
      - {name: json, paths: ["/json"], methods: [GET]}
      - {name: echo, paths: ["/echo"], methods: [POST]}
    policies:
      - key-auth: {}
      - rate-limit:
          limits: [{name: per-minute, algorithm: sliding-window, limit: 100000000, window: 60s}]
          by: consumer
          store: local
consumers:
  - {name: bench, keys: ["@MASTER_KEY@"]}
