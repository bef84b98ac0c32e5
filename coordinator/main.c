/* main.c - kvrelay-coordinator: the cluster's front door (rank of role coordinator in
 * the MPI job). The MPI thread (this one) runs the router; grpc_server.c runs its own
 * completion-queue thread. See docs/ARCHITECTURE.md. */
#include <stddef.h>
#include <stdio.h>

#include "grpc_server.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "role.h"
#include "router.h"
#include "status.h"
#include "tokenizer.h"

struct coord_cfg {
    const char *model;
    const char *tokenizer;
    const char *listen;
    int queue_max;
    float queue_timeout;
    float node_timeout;
    float startup_timeout;
    int max_retries;
};

static const struct kvr_opt opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct coord_cfg, model), NULL, 0, -1, NULL, 1, "checkpoint every node serves (checked by fingerprint)"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct coord_cfg, tokenizer), NULL, 0, -1, NULL, 1, "tokenizer.bin of the model"},
    {"listen", KVR_OPT_STRING, offsetof(struct coord_cfg, listen), "0.0.0.0:50051", 0, -1, NULL, 0, "gRPC listen address"},
    {"queue-max", KVR_OPT_INT, offsetof(struct coord_cfg, queue_max), "1024", 1, 1 << 20, NULL, 0, "requests waiting for KV memory at most (then RESOURCE_EXHAUSTED)"},
    {"queue-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, queue_timeout), "30", 0.01, 86400, NULL, 0, "seconds a request may wait for KV memory"},
    {"node-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, node_timeout), "10", 0.2, 86400, NULL, 0, "seconds of silence after which a node is dead"},
    {"startup-timeout", KVR_OPT_FLOAT, offsetof(struct coord_cfg, startup_timeout), "600", 1, 86400, NULL, 0, "seconds to wait for every node to load the model"},
    {"max-retries", KVR_OPT_INT, offsetof(struct coord_cfg, max_retries), "2", 0, 15, NULL, 0, "re-runs of a request whose node died"},
};

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
    if ((rc = kvr_role_load_model(x, rp.prog, cfg.model, KVR_WEIGHTS_MMAP, &model)) != KVR_OK)
        kvr_role_exit(x, rc);
    const struct kvr_model_config *c = kvr_model_config(model);
    if ((rc = kvr_tokenizer_load(cfg.tokenizer, c->vocab_size, &tok)) != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: cannot load tokenizer '%s': %s\n", cfg.tokenizer, kvr_status_str(rc));
        kvr_role_exit(x, KVR_EIO);
    }
    struct coord_router_params rtp = {.xfer = x, .ops = &coord_grpc_stream_ops, .queue_max = cfg.queue_max,
                                     .queue_timeout_s = cfg.queue_timeout, .node_timeout_s = cfg.node_timeout,
                                     .max_retries = cfg.max_retries};
    if ((rc = coord_router_create(&rtp, &router)) != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: %s\n", kvr_status_str(rc));
        kvr_role_exit(x, KVR_EIO);
    }
    int seq_len = 0, vocab = 0;
    rc = coord_router_wait_nodes(router, cfg.startup_timeout, kvr_model_fingerprint(model), &seq_len, &vocab);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: the cluster did not come up: %s (see the log lines above)\n",
                kvr_status_str(rc));
        kvr_role_exit(x, KVR_EIO);
    }
    struct coord_grpc_params gp = {.addr = cfg.listen, .router = router, .tok = tok, .seq_len = seq_len,
                                   .vocab_size = vocab, .shutdown_grace_ms = 2000};
    if ((rc = coord_grpc_start(&gp, &grpc)) != KVR_OK) {
        fprintf(stderr, "kvrelay-coordinator: cannot serve gRPC on %s: %s\n", cfg.listen, kvr_status_str(rc));
        coord_router_shutdown(router);
        kvr_role_exit(x, KVR_EIO);
    }
    fprintf(stderr, "kvrelay-coordinator: serving kvrelay.v1.Inference on %s (port %d)\n", cfg.listen,
            coord_grpc_port(grpc));
    struct kvr_idle idle = {0};
    while (!kvr_role_stop)
        kvr_idle_turn(&idle, coord_router_poll(router));
    KVR_LOG_INFO("stopping: answering every open request, then the gRPC server, then the nodes");
    coord_router_shutdown(router);
    coord_grpc_stop(grpc);
    coord_router_free(router);
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    kvr_xfer_finalize(x, 2.0);
    return 0;
}
