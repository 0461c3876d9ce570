# key-auth + one sliding-window limit high enough never to reject, in Redis (started by
# with_redis.sh on port 18299, on the system's CPU).
version: 1
gateway: {listen: "127.0.0.1:@PORT@", workers: 1}
admin: {listen: null}
storage: "sqlite:///@SYSDIR@/tollgate.db"
logs: {enabled: false}  # call records are measured by tollgate-full, not here
cluster: {redis: "redis://127.0.0.1:18299/0"}
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
          store: redis
consumers:
  - {name: bench, keys: ["@MASTER_KEY@"]}
