/* main.c - kvrelay-coordinator: the cluster's front door (rank of role coordinator in
 * the MPI job). The MPI thread (this one) runs the router; grpc_server.c runs its own
 * completion-queue thread, http_server.c its libmicrohttpd threads. See
 * docs/ARCHITECTURE.md. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "clock.h"

#include "grpc_server.h"
#include "http_server.h"
#include "log.h"
#include "metrics.h"
#include "model.h"
#include "options.h"
#include "role.h"
#include "router.h"
#include "status.h"
#include "tokenizer.h"
#include "transport.h"
#include "xfer.h"

struct coord_cfg {
    const char *model;
    const char *tokenizer;
    const char *listen;
    int queue_max;
    float queue_timeout;
    float node_timeout;
    float startup_timeout;
    int max_retries;
    const char *tls_cert;
    const char *tls_key;
    const char *tls_client_ca;
    const char *auth_token_file;
    float keepalive_time;
    float keepalive_timeout;
    int max_streams;
    uint64_t max_message;
    int max_pending_tokens;
    float max_request_age;
    int context;
    int kv_type;
    const char *http_listen;
    const char *chat_template;
    const char *served_model_name;
    int decode_min, decode_max;
    const char *decode_spawn;
    const char *join_dir;
    float drain_timeout, join_timeout;
    float up_window, down_window, cooldown, warmup, wait_age, kv_high, kv_low, ttft_target, tpot_target;
};

static const struct kvr_opt opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct coord_cfg, model), NULL, 0, -1, NULL, 1, "model file every node serves, GGUF or llama2.c (checked by fingerprint)"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct coord_cfg, tokenizer), NULL, 0, -1, NULL, 0, "tokenizer.bin (llama2.c; or a GGUF file's vocabulary); default: the GGUF model's own"},
    {"context", KVR_OPT_INT, offsetof(struct coord_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens (0 = the model file's; the nodes must run the same)"},
    {"kv-type", KVR_OPT_CHOICE, offsetof(struct coord_cfg, kv_type), "f32", 0, -1, KVR_KV_TYPE_CHOICES, 0, "KV-cache element type every node must run (kvrelay up passes its --kv-type to every rank)"},
    {"listen", KVR_OPT_STRING, offsetof(struct coord_cfg, listen), "127.0.0.1:50051", 0, -1, NULL, 0, "gRPC listen address HOST:PORT (loopback by default: give 0.0.0.0:PORT to serve other machines)"},
    {"queue-max", KVR_OPT_INT, offsetof(struct coord_cfg, queue_max), "1024", 1, 1 << 20, NULL, 0, "requests waiting for KV memory at most (then RESOURCE_EXHAUSTED)"},
    {"queue-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, queue_timeout), "30", 0.01, 86400, NULL, 0, "seconds a request may wait for KV memory"},
    {"node-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, node_timeout), "10", 0.2, 86400, NULL, 0, "seconds of silence after which a node is dead"},
    {"startup-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, startup_timeout), "600", 1, 86400, NULL, 0, "seconds to wait for every node to load the model"},
    {"max-retries", KVR_OPT_INT, offsetof(struct coord_cfg, max_retries), "2", 0, 15, NULL, 0, "re-runs of a request whose node died"},
    {"tls-cert", KVR_OPT_STRING, offsetof(struct coord_cfg, tls_cert), NULL, 0, -1, NULL, 0, "PEM certificate chain of the server: turns TLS on (with --tls-key)"},
    {"tls-key", KVR_OPT_STRING, offsetof(struct coord_cfg, tls_key), NULL, 0, -1, NULL, 0, "PEM private key of --tls-cert"},
    {"tls-client-ca", KVR_OPT_STRING, offsetof(struct coord_cfg, tls_client_ca), NULL, 0, -1, NULL, 0, "PEM CA certificates: clients must present a certificate signed by one (mTLS)"},
    {"auth-token-file", KVR_OPT_STRING, offsetof(struct coord_cfg, auth_token_file), NULL, 0, -1, NULL, 0, "file of bearer tokens, one per line: every RPC but Health needs 'authorization: Bearer <token>'"},
    {"keepalive-time", KVR_OPT_FLOAT, offsetof(struct coord_cfg, keepalive_time), "60", 0, 86400, NULL, 0, "seconds between keepalive pings on an idle connection (0 = never)"},
    {"keepalive-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, keepalive_timeout), "20", 0.1, 3600, NULL, 0, "seconds to wait for a ping's answer before closing the connection"},
    {"max-concurrent-streams", KVR_OPT_INT, offsetof(struct coord_cfg, max_streams), "256", 1, 1 << 20, NULL, 0, "calls at once on one client connection"},
    {"max-message-bytes", KVR_OPT_SIZE, offsetof(struct coord_cfg, max_message), "4MiB", 1024, 1 << 30, NULL, 0, "largest gRPC message received or sent"},
    {"max-pending-tokens", KVR_OPT_INT, offsetof(struct coord_cfg, max_pending_tokens), "65536", 1, 1 << 24, NULL, 0, "generated tokens held for a client that reads slowly; past it the call ends with RESOURCE_EXHAUSTED"},
    {"max-request-age", KVR_OPT_FLOAT, offsetof(struct coord_cfg, max_request_age), "3600", 0.1, 31536000, NULL, 0, "seconds after which any request is ended (DEADLINE_EXCEEDED) whatever happened to it"},
    {"http-listen", KVR_OPT_STRING, offsetof(struct coord_cfg, http_listen), "127.0.0.1:8000", 0, -1, NULL, 0, "OpenAI-compatible HTTP API, /health and /metrics: HOST:PORT, or off"},
    {"chat-template", KVR_OPT_STRING, offsetof(struct coord_cfg, chat_template), "llama2", 0, -1, NULL, 0, "how /v1/chat/completions turns messages into a prompt: llama2, chatml or plain"},
    {"served-model-name", KVR_OPT_STRING, offsetof(struct coord_cfg, served_model_name), "", 0, -1, NULL, 0, "the model id of the HTTP API (default: the --model file's name)"},
    {"decode-spawn", KVR_OPT_STRING, offsetof(struct coord_cfg, decode_spawn), "", 0, -1, NULL, 0, "command line (space-separated) of a decode node to start with MPI_Comm_spawn when the pool grows (\"\": the pool cannot grow; kvrelay up sets it)"},
    {"join-dir", KVR_OPT_STRING, offsetof(struct coord_cfg, join_dir), "", 0, -1, NULL, 0, "directory where decode nodes started as jobs of their own (kvrelay-decode --join-dir) leave their MPI port; the coordinator connects to them (needs mpirun --ompi-server for both jobs; \"\": off)"},
    {"decode-min", KVR_OPT_INT, offsetof(struct coord_cfg, decode_min), "0", 0, 4096, NULL, 0, "autoscaler: fewest decode nodes (0 = autoscaler off)"},
    {"decode-max", KVR_OPT_INT, offsetof(struct coord_cfg, decode_max), "0", 0, 4096, NULL, 0, "most decode nodes (autoscaler and Scale; never more than the launcher can place; 0 = the nodes the job starts with, or --decode-min)"},
    {"scale-up-window", KVR_OPT_FLOAT, offsetof(struct coord_cfg, up_window), "1", 0, 3600, NULL, 0, "autoscaler: seconds the pool must be short (waiting requests, KV, TTFT/TPOT) before it grows by one"},
    {"scale-down-window", KVR_OPT_FLOAT, offsetof(struct coord_cfg, down_window), "5", 0, 3600, NULL, 0, "autoscaler: seconds the load must fit one node fewer before the pool shrinks by one"},
    {"scale-cooldown", KVR_OPT_FLOAT, offsetof(struct coord_cfg, cooldown), "2", 0, 3600, NULL, 0, "autoscaler: seconds between two changes"},
    {"scale-warmup", KVR_OPT_FLOAT, offsetof(struct coord_cfg, warmup), "1", 0, 3600, NULL, 0, "autoscaler: seconds after a node joins during which samples do not count"},
    {"scale-wait-age", KVR_OPT_FLOAT, offsetof(struct coord_cfg, wait_age), "0.2", 0, 3600, NULL, 0, "autoscaler: a request waiting for decode memory longer than this means the pool is short"},
    {"scale-kv-high", KVR_OPT_FLOAT, offsetof(struct coord_cfg, kv_high), "0.85", 0.01, 1, NULL, 0, "autoscaler: KV reserved fraction of the pool above which it is short"},
    {"scale-kv-low", KVR_OPT_FLOAT, offsetof(struct coord_cfg, kv_low), "0.5", 0, 1, NULL, 0, "autoscaler: shrink only if the reservations fit one node fewer below this fraction"},
    {"ttft-target-ms", KVR_OPT_FLOAT, offsetof(struct coord_cfg, ttft_target), "0", 0, 3.6e6, NULL, 0, "autoscaler: recent mean TTFT above this means the pool is short (0 = not a signal)"},
    {"tpot-target-ms", KVR_OPT_FLOAT, offsetof(struct coord_cfg, tpot_target), "0", 0, 3.6e6, NULL, 0, "autoscaler: recent mean TPOT above this means the pool is short (0 = not a signal)"},
    {"drain-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, drain_timeout), "30", 0, 86400, NULL, 0, "seconds a draining decode node's requests may take to finish; then they re-run elsewhere"},
    {"join-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, join_timeout), "60", 1, 86400, NULL, 0, "seconds a spawned decode node may take to join (or to leave) before it is given up"},
};

/* The whole of a small PEM file, NUL-terminated (owned), or NULL with the reason printed. */
static char *read_pem(const char *opt, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvrelay-coordinator: --%s %s: %s\n", opt, path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap + 1);
    if (buf)
        n = fread(buf, 1, cap + 1, f);
    fclose(f);
    if (buf)
        buf[n < cap ? n : cap] = '\0';
    if (!buf || n > cap || !strstr(buf, "-----BEGIN ")) {
        fprintf(stderr, "kvrelay-coordinator: --%s %s: %s\n", opt, path,
                !buf ? "out of memory" : n > cap ? "larger than 1 MiB, not a PEM file" : "not a PEM file (no -----BEGIN line)");
        free(buf);
        return NULL;
    }
    return buf;
}

/* Whether a listen address is a loopback one (where plaintext is between local users). */
static int loopback(const char *addr) {
    return !strncmp(addr, "127.", 4) || !strncmp(addr, "localhost:", 10) || !strncmp(addr, "[::1]:", 6) ||
           !strncmp(addr, "unix:", 5);
}

/* The HTTP front end's bearer-token check: the same tokens as gRPC's (--auth-token-file). */
static int http_authorize(void *ctx, const char *value) {
    return coord_auth_check(ctx, value, value ? strlen(value) : 0) == COORD_AUTH_OK ? 0 : -1;
}

/* The words of s (modified in place) as a NULL-terminated argv, or NULL for "". */
static char **split_words(char *s) {
    int n = 0;
    char **v = calloc(strlen(s) / 2 + 2, sizeof *v);
    if (!v)
        return NULL;
    for (char *t = strtok(s, " "); t; t = strtok(NULL, " "))
        v[n++] = t;
    if (n == 0) {
        free(v);
        return NULL;
    }
    return v;
}

int main(int argc, char **argv) {
    struct coord_cfg cfg;
    struct kvr_xfer *x = NULL;
    struct kvr_role_params rp = {.role = KVR_ROLE_COORD, .prog = "kvrelay-coordinator",
                                 .summary = "The cluster's gRPC front door (started by mpirun; see kvrelay up).",
                                 .opts = opts, .n_opts = (int)(sizeof opts / sizeof opts[0]), .cfg = &cfg};
    int rc = kvr_role_start(&rp, &argc, &argv, &x);
    if (rc != KVR_OK)
        kvr_role_exit(x, rc);

    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    struct coord_router *router = NULL;
    struct coord_grpc *grpc = NULL;
    struct coord_http *http = NULL;
    struct coord_metrics *metrics = NULL;
    int tpl = coord_chat_template_from_name(cfg.chat_template);
    if (tpl < 0) {
        fprintf(stderr, "kvrelay-coordinator: --chat-template must be llama2, chatml or plain (got '%s')\n",
                cfg.chat_template);
        kvr_role_exit(x, KVR_EINVAL);
    }
    const char *model_name = cfg.served_model_name[0] ? cfg.served_model_name : cfg.model;
    if (!cfg.served_model_name[0] && strrchr(model_name, '/'))
        model_name = strrchr(model_name, '/') + 1;
    if (coord_metrics_create(model_name, &metrics) != KVR_OK)
        kvr_role_exit(x, KVR_ENOMEM);
    if ((rc = kvr_role_load_model(x, rp.prog, cfg.model, KVR_WEIGHTS_MMAP, cfg.context, &model)) != KVR_OK)
        kvr_role_exit(x, rc);
    const struct kvr_model_config *c = kvr_model_config(model);
    if ((rc = kvr_model_load_tokenizer(model, cfg.tokenizer, &tok)) != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: cannot load the tokenizer of '%s': %s\n",
                cfg.tokenizer ? cfg.tokenizer : cfg.model, kvr_status_str(rc));
        kvr_role_exit(x, KVR_EIO);
    }
    /* Security material first: a bad file is one clear line before the cluster waits. */
    char *cert = NULL, *key = NULL, *client_ca = NULL;
    struct coord_auth *auth = NULL;
    if (!cfg.tls_cert != !cfg.tls_key) {
        fprintf(stderr, "kvrelay-coordinator: --tls-cert and --tls-key go together\n");
        kvr_role_exit(x, KVR_EINVAL);
    }
    if (cfg.tls_client_ca && !cfg.tls_cert) {
        fprintf(stderr, "kvrelay-coordinator: --tls-client-ca needs TLS (--tls-cert and --tls-key)\n");
        kvr_role_exit(x, KVR_EINVAL);
    }
    if ((cfg.tls_cert && !(cert = read_pem("tls-cert", cfg.tls_cert))) ||
        (cfg.tls_key && !(key = read_pem("tls-key", cfg.tls_key))) ||
        (cfg.tls_client_ca && !(client_ca = read_pem("tls-client-ca", cfg.tls_client_ca))))
        kvr_role_exit(x, KVR_EINVAL);
    if (cfg.auth_token_file) {
        char err[256];
        if (coord_auth_load(cfg.auth_token_file, &auth, err, sizeof err) != KVR_OK) {
            fprintf(stderr, "kvrelay-coordinator: --auth-token-file: %s\n", err);
            kvr_role_exit(x, KVR_EINVAL);
        }
    }
    if (!loopback(cfg.listen) && !cert)
        KVR_LOG_WARN("listening on %s without TLS: requests%s travel in clear text", cfg.listen,
                     auth ? " and bearer tokens" : "");
    if (!loopback(cfg.listen) && !auth && !client_ca)
        KVR_LOG_WARN("listening on %s without --auth-token-file or --tls-client-ca: anyone who can "
                     "reach it may use the cluster", cfg.listen);
    if (cfg.decode_min > 0 && cfg.decode_max < cfg.decode_min)
        cfg.decode_max = cfg.decode_max ? cfg.decode_max : cfg.decode_min;
    if (cfg.decode_min > 0 && cfg.decode_max < cfg.decode_min) {
        fprintf(stderr, "kvrelay-coordinator: --decode-max %d is below --decode-min %d\n", cfg.decode_max,
                cfg.decode_min);
        kvr_role_exit(x, KVR_EINVAL);
    }
    int n_decode0 = 0;
    for (int i = 0; i < kvr_xfer_size(x); i++)
        n_decode0 += kvr_xfer_role_of(x, i) == KVR_ROLE_DECODE;
    char *spawn_line = strdup(cfg.decode_spawn);
    char **spawn_argv = spawn_line ? split_words(spawn_line) : NULL;
    struct coord_router_params rtp = {.tp = coord_transport_mpi(x, spawn_argv), .ops = &coord_front_ops,
                                      .autoscale = cfg.decode_min > 0, .decode_min = cfg.decode_min,
                                      .decode_max = cfg.decode_max ? cfg.decode_max
                                                                   : (cfg.decode_min > n_decode0 ? cfg.decode_min : n_decode0),
                                      .as = {.min = cfg.decode_min, .max = cfg.decode_max,
                                             .up_window_s = cfg.up_window, .down_window_s = cfg.down_window,
                                             .cooldown_s = cfg.cooldown, .warmup_s = cfg.warmup,
                                             .wait_age_s = cfg.wait_age, .kv_high = cfg.kv_high, .kv_low = cfg.kv_low,
                                             .ttft_target_ms = cfg.ttft_target, .tpot_target_ms = cfg.tpot_target},
                                      .drain_timeout_s = cfg.drain_timeout, .join_timeout_s = cfg.join_timeout,
                                      .can_spawn = spawn_argv != NULL, .join_dir = cfg.join_dir,
                                     .expected_nodes = kvr_xfer_size(x) - 1, .queue_max = cfg.queue_max,
                                     .kv_type = cfg.kv_type,
                                     .queue_timeout_s = cfg.queue_timeout, .node_timeout_s = cfg.node_timeout,
                                     .max_retries = cfg.max_retries, .max_request_age_s = cfg.max_request_age};
    if ((rc = coord_router_create(&rtp, &router)) != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: %s\n", kvr_status_str(rc));
        kvr_role_exit(x, KVR_EIO);
    }
    int seq_len = 0, vocab = 0;
    rc = coord_router_wait_nodes(router, cfg.startup_timeout, kvr_model_fingerprint(model), &seq_len, &vocab);
    if (rc == KVR_OK && seq_len != c->seq_len) {
        KVR_LOG_ERROR("the nodes run the model at context %d, the coordinator at %d: give every process "
                      "the same --context", seq_len, c->seq_len);
        rc = KVR_EINVAL;
    }
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: the cluster did not come up: %s (see the log lines above)\n",
                kvr_status_str(rc));
        /* The nodes that said hello leave now (a refused model or context), instead of
         * after --coord-timeout of silence; their SHUTDOWNs get two seconds to go out. */
        coord_router_shutdown(router);
        double t_flush = kvr_clock_now() + 2.0;
        while (kvr_xfer_progress(x) > 0 && kvr_clock_now() < t_flush)
            kvr_sleep_ms(1);
        kvr_role_exit(x, KVR_EIO);
    }
    /* HTTP first: once gRPC's Health answers (kvrelay up waits for it), HTTP serves too. */
    int http_on = cfg.http_listen[0] && strcmp(cfg.http_listen, "off") != 0;
    if (http_on) {
        struct coord_http_params hp = {.addr = cfg.http_listen, .router = router, .tok = tok, .seq_len = seq_len,
                                       .vocab_size = vocab, .model_name = model_name,
                                       .chat_template = (enum coord_chat_template)tpl, .metrics = metrics,
                                       .authorize = auth ? http_authorize : NULL, .authorize_ctx = auth};
        if ((rc = coord_http_start(&hp, &http)) != KVR_OK) {
            fprintf(stderr, "kvrelay-coordinator: cannot serve HTTP on %s: %s\n", cfg.http_listen,
                    kvr_status_str(rc));
            coord_router_shutdown(router);
            kvr_role_exit(x, KVR_EIO);
        }
    }
    struct coord_grpc_params gp = {.addr = cfg.listen, .router = router, .tok = tok, .seq_len = seq_len,
                                   .vocab_size = vocab, .shutdown_grace_ms = 2000, .metrics = metrics,
                                   .tls_cert_pem = cert, .tls_key_pem = key, .tls_client_ca_pem = client_ca,
                                   .auth = auth,
                                   .keepalive_time_ms = cfg.keepalive_time > 0 ? (int)(cfg.keepalive_time * 1000.0f) : -1,
                                   .keepalive_timeout_ms = (int)(cfg.keepalive_timeout * 1000.0f),
                                   .max_concurrent_streams = cfg.max_streams,
                                   .max_message_bytes = (int)cfg.max_message,
                                   .max_pending_tokens = cfg.max_pending_tokens};
    rc = coord_grpc_start(&gp, &grpc);
    free(cert);
    free(key);
    free(client_ca);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: cannot serve gRPC on %s: %s\n", cfg.listen, kvr_status_str(rc));
        coord_router_shutdown(router);
        coord_http_stop(http);
        kvr_role_exit(x, KVR_EIO);
    }
    fprintf(stderr, "kvrelay-coordinator: serving kvrelay.v1.Inference on %s (port %d)\n", cfg.listen,
            coord_grpc_port(grpc));
    if (http_on)
        fprintf(stderr, "kvrelay-coordinator: serving HTTP (OpenAI API, /health, /metrics) on %s (port %d)\n",
                cfg.http_listen, coord_http_port(http));
    struct kvr_idle idle = {0};
    while (!kvr_role_stop)
        kvr_idle_turn(&idle, coord_router_poll(router));
    KVR_LOG_INFO("stopping: answering every open request, then the gRPC server, then the nodes");
    coord_router_shutdown(router);
    coord_grpc_stop(grpc);
    coord_http_stop(http);
    coord_router_free(router);
    coord_auth_free(auth);
    coord_metrics_free(metrics);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    free(spawn_argv);
    free(spawn_line);
    kvr_xfer_finalize(x, 2.0, 0);
    return 0;
}
