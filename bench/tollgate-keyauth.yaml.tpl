# key-auth on every request: the bench's bearer key is checked against a hashed consumer key.
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
    policies: [{key-auth: {}}]
consumers:
  - {name: bench, keys: ["@MASTER_KEY@"]}
