# key-auth + one sliding-window limit high enough never to reject, in the node-wide store.
version: 1
gateway: {listen: "127.0.0.1:@PORT@", workers: 1}
admin: {listen: null}
storage: "sqlite:///@SYSDIR@/tollgate.db"
logs: {enabled: false}  # call records are measured by tollgate-full, not here
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
