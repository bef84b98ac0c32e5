/* test_grpc_security.c - the coordinator's gRPC edge as a hostile or unlucky client meets
 * it (issue 15, item 7 and the gRPC half of item 8), on real localhost ports with the
 * real client and fake_router.c in place of the MPI router:
 *   - coordinator/auth.c: token files, the Bearer syntax, rotation (several tokens);
 *   - TLS with certificates made at test time by openssl: no CA, a foreign CA, a wrong
 *     server name all fail; the right CA succeeds; mTLS without and with a client cert;
 *   - bearer tokens: missing, wrong, right; Health stays open; ClusterStatus (host names)
 *     is refused without the token;
 *   - limits: a message over --max-message-bytes is refused; one stream per connection
 *     (max_concurrent_streams 1) holds a second call back; a client that reads slower
 *     than tokens arrive gets RESOURCE_EXHAUSTED once max_pending_tokens are waiting, the
 *     queue never holds more, and the request is cancelled in the cluster. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "check.h"
#include "clock.h"
#include "fake_router.h"
#include "grpc_client.h"
#include "grpc_codes.h"
#include "grpc_server.h"
#include "log.h"
#include "status.h"
#include "tokenizer.h"

#define SEQ_LEN 512
#define VOCAB   512

enum {
    C_OK = 0,
    C_RESOURCE_EXHAUSTED = 8,
    C_UNAVAILABLE = 14,
    C_UNAUTHENTICATED = 16,
};

static struct kvr_tokenizer *tok;
static char dir[] = "/tmp/kvr_test_sec_XXXXXX";

static const char *path_in(const char *name) {
    static char buf[8][1100];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", dir, name);
    return buf[k];
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    static char tmp[1 << 16];
    size_t n = fread(tmp, 1, sizeof tmp - 1, f);
    fclose(f);
    tmp[n] = '\0';
    char *s = strdup(tmp);
    REQUIRE(s);
    return s;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    REQUIRE(f);
    fputs(text, f);
    fclose(f);
}

/* Runs a shell command in dir, quietly; 0 on success. */
static int sh(const char *cmd) {
    char full[4096];
    snprintf(full, sizeof full, "cd %s && (%s) >openssl.log 2>&1", dir, cmd);
    int rc = system(full);
    if (rc != 0) {
        fprintf(stderr, "command failed (%d): %s\n", rc, cmd);
        char log[1100];
        snprintf(log, sizeof log, "cat %s/openssl.log >&2", dir);
        if (system(log) != 0)
            fprintf(stderr, "(no log)\n");
    }
    return rc;
}

/* A CA, a server certificate for DNS kvrelay.test and IP 127.0.0.1 signed by it, a client
 * certificate signed by it, and an unrelated CA. */
static int make_certs(void) {
    const char *cnf = "[req]\ndistinguished_name=dn\n[dn]\n"
                      "[srv]\nsubjectAltName=DNS:kvrelay.test,IP:127.0.0.1\n"
                      "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                      "[cli]\nbasicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
    write_file(path_in("x.cnf"), cnf);
    return sh("openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=kvrelay-test-ca "
              "-keyout ca.key -out ca.pem && "
              "openssl req -newkey rsa:2048 -nodes -subj /CN=kvrelay.test -config x.cnf "
              "-keyout srv.key -out srv.csr && "
              "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
              "-extfile x.cnf -extensions srv -out srv.pem && "
              "openssl req -newkey rsa:2048 -nodes -subj /CN=client -config x.cnf "
              "-keyout cli.key -out cli.csr && "
              "openssl x509 -req -in cli.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
              "-extfile x.cnf -extensions cli -out cli.pem && "
              "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue-ca "
              "-keyout rogue.key -out rogue.pem");
}

/* ---- coordinator/auth.c ------------------------------------------------------------- */

static void test_auth_module(void) {
    char err[256];
    struct coord_auth *a = NULL;
    write_file(path_in("tokens"),
               "# kvrelay tokens\n\n  old-token-0123456789  \r\nnew-token-abcdefghij\n");
    REQUIRE(coord_auth_load(path_in("tokens"), &a, err, sizeof err) == KVR_OK);
    CHECK_EQ(coord_auth_count(a), 2);
    const char *v;
#define VERDICT(s) coord_auth_check(a, (s), strlen(s))
    CHECK_EQ(coord_auth_check(a, NULL, 0), COORD_AUTH_MISSING);
    CHECK_EQ(VERDICT(""), COORD_AUTH_MISSING);
    CHECK_EQ(VERDICT("Bearer old-token-0123456789"), COORD_AUTH_OK);
    CHECK_EQ(VERDICT("Bearer new-token-abcdefghij"), COORD_AUTH_OK);
    CHECK_EQ(VERDICT("bearer   new-token-abcdefghij"), COORD_AUTH_OK); /* scheme case, spaces */
    CHECK_EQ(VERDICT("BEARER new-token-abcdefghij"), COORD_AUTH_OK);
    CHECK_EQ(VERDICT("Bearer new-token-abcdefghi"), COORD_AUTH_WRONG);   /* a prefix */
    CHECK_EQ(VERDICT("Bearer new-token-abcdefghijk"), COORD_AUTH_WRONG); /* longer */
    CHECK_EQ(VERDICT("Bearer new-token-abcdefghiJ"), COORD_AUTH_WRONG);  /* last byte */
    CHECK_EQ(VERDICT("Bearer Xew-token-abcdefghij"), COORD_AUTH_WRONG);  /* first byte */
    CHECK_EQ(VERDICT("Bearer new-token-abcdefghijnew-token-abcdefghij"), COORD_AUTH_WRONG);
    CHECK_EQ(VERDICT("Bearer "), COORD_AUTH_MALFORMED);
    CHECK_EQ(VERDICT("Basic bmV3LXRva2Vu"), COORD_AUTH_MALFORMED);
    CHECK_EQ(VERDICT("Bearernew-token-abcdefghij"), COORD_AUTH_MALFORMED);
    CHECK_EQ(VERDICT("new-token-abcdefghij"), COORD_AUTH_MALFORMED);
    /* Not NUL-terminated: only len bytes count. */
    v = "Bearer new-token-abcdefghijXXXX";
    CHECK_EQ(coord_auth_check(a, v, strlen(v) - 4), COORD_AUTH_OK);
#undef VERDICT
    coord_auth_free(a);

    /* Files that hold no usable token are refused with a reason (never the token). */
    write_file(path_in("bad"), "# nothing\n\n");
    CHECK_EQ(coord_auth_load(path_in("bad"), &a, err, sizeof err), KVR_EINVAL);
    CHECK(strstr(err, "no token") != NULL);
    write_file(path_in("bad"), "short\n");
    CHECK_EQ(coord_auth_load(path_in("bad"), &a, err, sizeof err), KVR_EINVAL);
    CHECK(strstr(err, "line 1") != NULL && !strstr(err, "short"));
    write_file(path_in("bad"), "a-long-enough-token with-a-space\n");
    CHECK_EQ(coord_auth_load(path_in("bad"), &a, err, sizeof err), KVR_EINVAL);
    CHECK(strstr(err, "visible ASCII") != NULL);
    CHECK_EQ(coord_auth_load(path_in("missing"), &a, err, sizeof err), KVR_EIO);
    CHECK(a == NULL);
}

/* ---- servers ------------------------------------------------------------------------- */

static struct coord_grpc *start(struct coord_grpc_params gp, char *addr, size_t len) {
    gp.addr = "127.0.0.1:0";
    gp.router = fake_router_get();
    gp.tok = tok;
    gp.seq_len = SEQ_LEN;
    gp.vocab_size = VOCAB;
    struct coord_grpc *g = NULL;
    REQUIRE(coord_grpc_start(&gp, &g) == KVR_OK);
    snprintf(addr, len, "127.0.0.1:%d", coord_grpc_port(g));
    return g;
}

static int health(const char *addr, const struct kvr_client_opts *o, struct kvr_rpc_status *st) {
    struct kvr_client *c = NULL;
    REQUIRE(kvr_client_create_opts(addr, o, &c, NULL, 0) == KVR_OK);
    int serving = 0;
    int code = kvr_client_health(c, 10, &serving, NULL, 0, st);
    kvr_client_free(c);
    return code;
}

static int generate(const char *addr, const struct kvr_client_opts *o, int *n_tokens,
                    struct kvr_rpc_status *st) {
    struct kvr_client *c = NULL;
    REQUIRE(kvr_client_create_opts(addr, o, &c, NULL, 0) == KVR_OK);
    struct kvr_gen_usage u;
    struct kvr_gen_params p = {
        .prompt = "Once upon a time", .max_tokens = 5, .kv_sinks = -1, .timeout_s = 10};
    memset(&u, 0, sizeof u);
    int code = kvr_client_generate(c, &p, NULL, NULL, &u, st);
    if (n_tokens)
        *n_tokens = u.generated_tokens;
    kvr_client_free(c);
    return code;
}

static int cluster_status(const char *addr, const struct kvr_client_opts *o, char *host,
                          size_t host_len, struct kvr_rpc_status *st) {
    struct kvr_client *c = NULL;
    REQUIRE(kvr_client_create_opts(addr, o, &c, NULL, 0) == KVR_OK);
    struct coord_cluster_status cs = {0};
    int code = kvr_client_cluster_status(c, 10, &cs, st);
    snprintf(host, host_len, "%s", cs.n_nodes > 0 ? cs.nodes[0].host : "");
    coord_cluster_status_deinit(&cs);
    kvr_client_free(c);
    return code;
}

static void set_status(void) {
    static struct coord_node_status nodes[2] = {
        {.rank = 1, .role = "prefill", .host = "secret-host-a", .alive = 1},
        {.rank = 2, .role = "decode", .host = "secret-host-b", .alive = 1}};
    struct coord_cluster_status st = {.n_nodes = 2, .nodes = nodes};
    st.seq_len = SEQ_LEN;
    st.vocab_size = VOCAB;
    fake_router_set_status(&st);
}

static void test_tls_and_tokens(void) {
    char err[256];
    struct coord_auth *auth = NULL;
    const char *toks[] = {"right-token-0123456789"};
    REQUIRE(coord_auth_create(toks, 1, &auth, err, sizeof err) == KVR_OK);
    char *cert = slurp(path_in("srv.pem")), *key = slurp(path_in("srv.key"));
    char addr[64];
    struct coord_grpc *g =
        start((struct coord_grpc_params){.tls_cert_pem = cert, .tls_key_pem = key, .auth = auth},
              addr, sizeof addr);
    struct fake_router_cfg cfg = {.emit = 5, .per_call = 1, .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&cfg);
    set_status();
    struct kvr_rpc_status st;
    int n = 0;
    char host[64];

    /* Without TLS, or without trusting its CA, nothing gets through (and "not reached"). */
    struct kvr_client_opts plain = {0};
    CHECK_EQ(health(addr, &plain, &st), C_UNAVAILABLE);
    CHECK_EQ(st.reached, 0);
    struct kvr_client_opts no_ca = {.tls = 1, .tls_server_name = "kvrelay.test"};
    CHECK_EQ(health(addr, &no_ca, &st), C_UNAVAILABLE);
    CHECK_EQ(st.reached, 0);
    struct kvr_client_opts rogue = {.tls_ca_file = path_in("rogue.pem"),
                                    .tls_server_name = "kvrelay.test"};
    CHECK_EQ(health(addr, &rogue, &st), C_UNAVAILABLE);
    struct kvr_client_opts wrong_name = {.tls_ca_file = path_in("ca.pem"),
                                         .tls_server_name = "other.test"};
    CHECK_EQ(health(addr, &wrong_name, &st), C_UNAVAILABLE);

    /* The right CA: by the certificate's DNS name, and by its IP address (no override). */
    struct kvr_client_opts ok = {.tls_ca_file = path_in("ca.pem"),
                                 .tls_server_name = "kvrelay.test"};
    CHECK_EQ(health(addr, &ok, &st), C_OK); /* Health needs no token */
    struct kvr_client_opts by_ip = {.tls_ca_file = path_in("ca.pem")};
    CHECK_EQ(health(addr, &by_ip, &st), C_OK);

    /* Tokens: missing, wrong, right. */
    CHECK_EQ(generate(addr, &ok, &n, &st), C_UNAUTHENTICATED);
    CHECK(strstr(st.message, "bearer token") != NULL);
    CHECK_EQ(st.reached, 1);
    CHECK_EQ(cluster_status(addr, &ok, host, sizeof host, &st), C_UNAUTHENTICATED);
    CHECK(!strstr(st.message, "secret-host"));
    struct kvr_client_opts wrong = ok;
    wrong.token = "wrong-token-0123456789";
    CHECK_EQ(generate(addr, &wrong, &n, &st), C_UNAUTHENTICATED);
    CHECK_STREQ(st.message, "invalid bearer token");
    CHECK_EQ(cluster_status(addr, &wrong, host, sizeof host, &st), C_UNAUTHENTICATED);
    struct kvr_client_opts right = ok;
    right.token = "right-token-0123456789";
    CHECK_EQ(generate(addr, &right, &n, &st), C_OK);
    CHECK_EQ(n, 5);
    CHECK_EQ(cluster_status(addr, &right, host, sizeof host, &st), C_OK);
    CHECK_STREQ(host, "secret-host-a");
    /* Unknown methods need the token too (they learn nothing either way). */
    struct kvr_client *c = NULL;
    REQUIRE(kvr_client_create_opts(addr, &ok, &c, NULL, 0) == KVR_OK);
    uint8_t *resp = NULL;
    size_t rlen = 0;
    CHECK_EQ(kvr_client_unary(c, "/kvrelay.v1.Inference/Nope", "", 0, 10, &resp, &rlen, &st),
             C_UNAUTHENTICATED);
    free(resp);
    kvr_client_free(c);

    /* Refused calls never reached the router. */
    struct fake_router_stats fs;
    CHECK_EQ(fake_router_wait_idle(10), 0);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_submits, 1);
    fake_router_reset();

    /* kvrelay submit / status: the options do the same end to end. */
    write_file(path_in("client-token"), "# mine\nright-token-0123456789\n");
    write_file(path_in("wrong-token"), "wrong-token-0123456789\n");
    char cmd[4096];
    const char *bin = KVR_BIN_DIR "/kvrelay";
    snprintf(
        cmd, sizeof cmd,
        "%s submit --addr %s --prompt hi --max-tokens 3 --tls-ca %s --tls-server-name kvrelay.test "
        "--auth-token-file %s >/dev/null 2>&1",
        bin, addr, path_in("ca.pem"), path_in("client-token"));
    CHECK_EQ(WEXITSTATUS(system(cmd)), 0);
    snprintf(
        cmd, sizeof cmd,
        "%s submit --addr %s --prompt hi --max-tokens 3 --tls-ca %s --tls-server-name kvrelay.test "
        "--auth-token-file %s >/dev/null 2>&1",
        bin, addr, path_in("ca.pem"), path_in("wrong-token"));
    CHECK_EQ(WEXITSTATUS(system(cmd)), 3); /* refused by a server that answered */
    snprintf(cmd, sizeof cmd,
             "%s status --addr %s --tls --tls-server-name kvrelay.test >/dev/null 2>&1", bin, addr);
    CHECK_EQ(WEXITSTATUS(system(cmd)), 4); /* no trusted server reached */
    snprintf(cmd, sizeof cmd, "%s status --addr %s --tls-ca %s >/dev/null 2>&1", bin, addr,
             path_in("ca.pem"));
    CHECK_EQ(WEXITSTATUS(system(cmd)), 3); /* UNAUTHENTICATED */
    snprintf(
        cmd, sizeof cmd,
        "%s status --addr %s --tls-ca %s --auth-token-file %s 2>/dev/null | grep -q secret-host-b",
        bin, addr, path_in("ca.pem"), path_in("client-token"));
    CHECK_EQ(WEXITSTATUS(system(cmd)), 0);
    snprintf(cmd, sizeof cmd, "%s status --addr %s --auth-token-file %s/none >/dev/null 2>&1", bin,
             addr, dir);
    CHECK_EQ(WEXITSTATUS(system(cmd)), 1); /* unreadable token file */
    fake_router_wait_idle(10);
    fake_router_reset();

    coord_grpc_stop(g);
    coord_auth_free(auth);
    free(cert);
    free(key);
}

static void test_mtls(void) {
    char *cert = slurp(path_in("srv.pem")), *key = slurp(path_in("srv.key")),
         *ca = slurp(path_in("ca.pem"));
    char addr[64];
    struct coord_grpc *g = start((struct coord_grpc_params){.tls_cert_pem = cert,
                                                            .tls_key_pem = key,
                                                            .tls_client_ca_pem = ca},
                                 addr, sizeof addr);
    struct kvr_rpc_status st;
    struct kvr_client_opts no_cert = {.tls_ca_file = path_in("ca.pem"),
                                      .tls_server_name = "kvrelay.test"};
    CHECK_EQ(health(addr, &no_cert, &st), C_UNAVAILABLE);
    struct kvr_client_opts foreign = no_cert;
    foreign.tls_cert_file = path_in("rogue.pem");
    foreign.tls_key_file = path_in("rogue.key");
    CHECK_EQ(health(addr, &foreign, &st), C_UNAVAILABLE);
    struct kvr_client_opts with_cert = no_cert;
    with_cert.tls_cert_file = path_in("cli.pem");
    with_cert.tls_key_file = path_in("cli.key");
    CHECK_EQ(health(addr, &with_cert, &st), C_OK);
    coord_grpc_stop(g);
    free(cert);
    free(key);
    free(ca);

    /* Bad set-ups are refused at start, not at the first connection. */
    struct coord_grpc *bad = NULL;
    int prev = kvr_log_set_level(-1);
    struct coord_grpc_params gp = {.addr = "127.0.0.1:0",
                                   .router = fake_router_get(),
                                   .tok = tok,
                                   .seq_len = SEQ_LEN,
                                   .vocab_size = VOCAB,
                                   .tls_cert_pem = "-----BEGIN CERTIFICATE-----\nnot\n"};
    CHECK_EQ(coord_grpc_start(&gp, &bad), KVR_EGRPC); /* no key */
    gp.tls_key_pem = "-----BEGIN PRIVATE KEY-----\nnot\n";
    CHECK_EQ(coord_grpc_start(&gp, &bad), KVR_EGRPC); /* garbage PEM */
    kvr_log_set_level(prev);
    CHECK(bad == NULL);
}

/* ---- limits -------------------------------------------------------------------------- */

struct slow {
    int n;
    int sleep_ms;
};

static int slow_fn(void *ud, const struct kvr_gen_msg *m) {
    struct slow *s = ud;
    if (m->has_token) {
        s->n++;
        struct timespec ts = {0, (long)s->sleep_ms * 1000000L};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static void test_limits(void) {
    char addr[64];
    const int cap = 64;
    struct coord_grpc *g =
        start((struct coord_grpc_params){.max_message_bytes = 4096, .max_pending_tokens = cap},
              addr, sizeof addr);
    struct kvr_rpc_status st;

    /* A request message over the limit: gRPC refuses it before our code sees it. */
    static char big[8192];
    memset(big, 'a', sizeof big - 1);
    struct kvr_client *c = NULL;
    REQUIRE(kvr_client_create(addr, &c) == KVR_OK);
    struct kvr_gen_params p = {.prompt = big, .max_tokens = 5, .kv_sinks = -1, .timeout_s = 10};
    CHECK_EQ(kvr_client_generate(c, &p, NULL, NULL, NULL, &st), C_RESOURCE_EXHAUSTED);
    kvr_client_free(c);

    /* A slow reader: 20000 tokens arrive at once; the client reads one every 20 ms with a
     * 4 KiB window. The call ends with RESOURCE_EXHAUSTED once more than `cap` tokens wait,
     * the queue never held more than cap, and the request is cancelled in the cluster. */
    fake_router_reset();
    struct fake_router_cfg cfg = {
        .emit = 20000, .per_call = 16, .stall = 1, .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&cfg);
    struct kvr_client_opts o = {.recv_window_bytes = 4096};
    REQUIRE(kvr_client_create_opts(addr, &o, &c, NULL, 0) == KVR_OK);
    struct slow s = {.sleep_ms = 20};
    p = (struct kvr_gen_params){.prompt = "Once upon a time",
                                .max_tokens = 20000,
                                .kv_policy = KVR_KV_SINK,
                                .kv_window = 64,
                                .kv_sinks = 4,
                                .timeout_s = 60};
    double t0 = kvr_clock_now();
    int code = kvr_client_generate(c, &p, slow_fn, &s, NULL, &st);
    fprintf(stderr, "slow reader: %s (%s) after %d tokens, %.2f s\n", kvr_grpc_code_name(code),
            st.message, s.n, kvr_clock_now() - t0);
    CHECK_EQ(code, C_RESOURCE_EXHAUSTED);
    CHECK(strstr(st.message, "reads too slowly") != NULL);
    CHECK(s.n < 20000);
    kvr_client_free(c);
    CHECK_EQ(fake_router_wait_idle(10), 0);
    struct fake_router_stats fs;
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_admitted, 1);
    CHECK_EQ(fake_router_cancels_of(100), 1); /* the cluster frees its blocks */
    CHECK_EQ(fs.n_finishes, 1);
    struct coord_grpc_stream_stats ss;
    double t_end = kvr_clock_now() + 5;
    do {
        coord_grpc_stream_stats(g, &ss);
    } while (ss.pending_tokens != 0 && kvr_clock_now() < t_end);
    CHECK_EQ(ss.pending_tokens, 0);
    CHECK(ss.pending_tokens_max <= cap);
    CHECK(ss.pending_tokens_max > cap - 16); /* it did fill up: the limit was what stopped it */
    CHECK_EQ(ss.overflowed_calls, 1);

    /* A reader that keeps up is not cut off: exactly cap tokens in one burst still fit. */
    fake_router_reset();
    cfg = (struct fake_router_cfg){
        .emit = cap, .per_call = cap, .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&cfg);
    REQUIRE(kvr_client_create_opts(addr, &o, &c, NULL, 0) == KVR_OK);
    s = (struct slow){.sleep_ms = 1};
    p.max_tokens = cap;
    CHECK_EQ(kvr_client_generate(c, &p, slow_fn, &s, NULL, &st), C_OK);
    CHECK_EQ(s.n, cap);
    kvr_client_free(c);
    coord_grpc_stream_stats(g, &ss);
    CHECK_EQ(ss.overflowed_calls, 1);
    fake_router_wait_idle(10);
    fake_router_reset();
    coord_grpc_stop(g);
}

/* ---- max concurrent streams ----------------------------------------------------------- */

static struct kvr_client *shared_client;
static atomic_int release_first; /* set by main, read by the first call's thread */

static int hold_fn(void *ud, const struct kvr_gen_msg *m) {
    (void)ud;
    if (m->has_token)
        while (!atomic_load(&release_first))
            kvr_sleep_ms(5);
    return m->has_token; /* cancel after the first token, once released */
}

struct stream_job {
    int code, n;
    pthread_t th;
    int hold;
};

static int count_fn(void *ud, const struct kvr_gen_msg *m) {
    struct stream_job *j = ud;
    j->n += m->has_token;
    return 0;
}

static void *stream_main(void *arg) {
    struct stream_job *j = arg;
    struct kvr_rpc_status st;
    struct kvr_gen_params p = {
        .prompt = "Once upon a time", .max_tokens = 3, .kv_sinks = -1, .timeout_s = 60};
    j->code = kvr_client_generate(shared_client, &p, j->hold ? hold_fn : count_fn, j, NULL, &st);
    return NULL;
}

/* --max-concurrent-streams 1: a second call on the same connection waits in the client
 * until the first ends, and then runs. */
static void test_max_streams(void) {
    char addr[64];
    fake_router_reset();
    struct coord_grpc *g =
        start((struct coord_grpc_params){.max_concurrent_streams = 1}, addr, sizeof addr);
    REQUIRE(kvr_client_create(addr, &shared_client) == KVR_OK);
    struct fake_router_cfg hold = {.emit = 1, .per_call = 1, .stall = 1};
    fake_router_configure(&hold);
    struct stream_job a = {.hold = 1}, b = {0};
    REQUIRE(pthread_create(&a.th, NULL, stream_main, &a) == 0);
    struct fake_router_stats fs;
    double t_end = kvr_clock_now() + 10;
    do {
        kvr_sleep_ms(5);
        fake_router_stats(&fs);
    } while (fs.n_admitted < 1 && kvr_clock_now() < t_end);
    REQUIRE(fs.n_admitted == 1);
    struct fake_router_cfg quick = {.emit = 3, .per_call = 1, .finish_reason = COORD_FINISH_LENGTH};
    fake_router_configure(&quick);
    REQUIRE(pthread_create(&b.th, NULL, stream_main, &b) == 0);
    /* The second call must not reach the server while the first holds the only stream. A
     * bounded look (1 s): if the limit were missing it would arrive within milliseconds. */
    t_end = kvr_clock_now() + 1.0;
    do {
        kvr_sleep_ms(10);
        fake_router_stats(&fs);
    } while (fs.n_submits == 1 && kvr_clock_now() < t_end);
    CHECK_EQ(fs.n_submits, 1);
    atomic_store(&release_first, 1);
    pthread_join(a.th, NULL);
    pthread_join(b.th, NULL);
    CHECK_EQ(a.code, 1); /* CANCELLED by its client */
    CHECK_EQ(b.code, C_OK);
    CHECK_EQ(b.n, 3);
    fake_router_wait_idle(10);
    fake_router_stats(&fs);
    CHECK_EQ(fs.n_submits, 2);
    kvr_client_free(shared_client);
    fake_router_reset();
    coord_grpc_stop(g);
}

int main(void) {
    kvr_log_init("test", -1);
    signal(SIGPIPE, SIG_IGN);
    REQUIRE(kvr_tokenizer_load(shared_path("models/tok512.bin"), VOCAB, &tok) == KVR_OK);
    REQUIRE(mkdtemp(dir));
    double t0 = kvr_clock_now();
    test_auth_module();
    test_limits();
    test_max_streams();
    if (system("openssl version >/dev/null 2>&1") != 0) {
        fprintf(stderr,
                "SKIP TLS tests: openssl is not installed (scripts/install-deps.sh installs it)\n");
    } else {
        REQUIRE(make_certs() == 0);
        test_tls_and_tokens();
        test_mtls();
    }
    fprintf(stderr, "test_grpc_security: %.2f s\n", kvr_clock_now() - t0);
    char rm[1200];
    snprintf(rm, sizeof rm, "rm -rf %s", dir);
    if (system(rm) != 0)
        fprintf(stderr, "cannot remove %s\n", dir);
    kvr_tokenizer_free(tok);
    CHECK_DONE();
}
