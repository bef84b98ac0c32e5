/* cmd_scale.c - `kvrelay scale` and `kvrelay drain`: the elastic decode pool's manual
 * controls (Scale and Drain RPCs of a running coordinator). */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include "cli.h"
#include "grpc_client.h"
#include "kvrelay.pb-c.h"
#include "options.h"
#include "status.h"

struct scale_cfg {
    const char *addr;
    int decode;
    int rank;
    float timeout;
};

/* clang-format off */
static const struct kvr_opt scale_opts[] = {
    {"addr", KVR_OPT_STRING, offsetof(struct scale_cfg, addr), "127.0.0.1:50051", 0, -1, NULL, 0, "coordinator address HOST:PORT"},
    {"decode", KVR_OPT_INT, offsetof(struct scale_cfg, decode), NULL, 1, 4096, NULL, 1, "decode nodes wanted (within the coordinator's bounds)"},
    {"timeout", KVR_OPT_FLOAT, offsetof(struct scale_cfg, timeout), "10", 0, 1e7, NULL, 0, "deadline in seconds (0 = none)"},
};
static const struct kvr_opt drain_opts[] = {
    {"addr", KVR_OPT_STRING, offsetof(struct scale_cfg, addr), "127.0.0.1:50051", 0, -1, NULL, 0, "coordinator address HOST:PORT"},
    {"rank", KVR_OPT_INT, offsetof(struct scale_cfg, rank), NULL, 0, 1 << 30, NULL, 1, "the decode node to drain (RANK in kvrelay status)"},
    {"timeout", KVR_OPT_FLOAT, offsetof(struct scale_cfg, timeout), "10", 0, 1e7, NULL, 0, "deadline in seconds (0 = none)"},
};
/* clang-format on */

/* Sends one admin call; prints the coordinator's detail line. */
static int admin_call(const char *cmd, const char *addr, const char *method, const void *req,
                      size_t len, double timeout, int is_scale) {
    struct kvr_client *client = NULL;
    int rc = kvr_client_create(addr, &client);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay %s: cannot use address '%s': %s\n", cmd, addr, kvr_status_str(rc));
        return KVR_EXIT_USAGE;
    }
    uint8_t *resp = NULL;
    size_t resp_len = 0;
    struct kvr_rpc_status st;
    kvr_client_unary(client, method, req, len, timeout, &resp, &resp_len, &st);
    kvr_client_free(client);
    if (st.code != 0) {
        fprintf(stderr, "kvrelay %s: %s: %s\n", cmd, kvr_grpc_code_name(st.code), st.message);
        free(resp);
        return st.reached ? KVR_EXIT_REJECTED : KVR_EXIT_UNREACHABLE;
    }
    const char *detail = "";
    ProtobufCMessage *m = NULL;
    if (is_scale) {
        Kvrelay__V1__ScaleResponse *r = kvrelay__v1__scale_response__unpack(NULL, resp_len, resp);
        if (r)
            detail = r->detail;
        m = r ? &r->base : NULL;
    } else {
        Kvrelay__V1__DrainResponse *r = kvrelay__v1__drain_response__unpack(NULL, resp_len, resp);
        if (r)
            detail = r->detail;
        m = r ? &r->base : NULL;
    }
    printf("%s\n", detail);
    if (m)
        protobuf_c_message_free_unpacked(m, NULL);
    free(resp);
    return KVR_EXIT_OK;
}

int kvr_cmd_scale(int argc, char **argv) {
    struct scale_cfg cfg;
    int done;
    int ex = kvr_cli_parse("scale", "Sets the decode pool's target size of a running cluster.",
                           scale_opts, (int)(sizeof scale_opts / sizeof scale_opts[0]), &cfg, argc,
                           argv, &done);
    if (done)
        return ex;
    Kvrelay__V1__ScaleRequest q;
    kvrelay__v1__scale_request__init(&q);
    q.decode = cfg.decode;
    uint8_t buf[32];
    size_t len = kvrelay__v1__scale_request__pack(&q, buf);
    return admin_call("scale", cfg.addr, "/kvrelay.v1.Inference/Scale", buf, len, cfg.timeout, 1);
}

int kvr_cmd_drain(int argc, char **argv) {
    struct scale_cfg cfg;
    int done;
    int ex = kvr_cli_parse(
        "drain",
        "Drains one decode node of a running cluster: no new placements, its requests "
        "finish, then it leaves.",
        drain_opts, (int)(sizeof drain_opts / sizeof drain_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    Kvrelay__V1__DrainRequest q;
    kvrelay__v1__drain_request__init(&q);
    q.rank = cfg.rank;
    uint8_t buf[32];
    size_t len = kvrelay__v1__drain_request__pack(&q, buf);
    return admin_call("drain", cfg.addr, "/kvrelay.v1.Inference/Drain", buf, len, cfg.timeout, 0);
}
