/* fuzz_msg_seeds.c - writes a seed corpus for fuzz_msg: one valid message of every kind
 * (with and without reasons, every policy, several event counts), written by the same
 * writers the nodes use. Usage: fuzz_msg_seeds DIR. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "msg.h"
#include "status.h"

static unsigned char buf[1 << 16];
static int n_files;
static const char *dir;

static void save(size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/seed_%03d", dir, n_files++);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len) {
        perror(path);
        if (f)
            fclose(f);
        return;
    }
    fclose(f);
}

#define SEED(call)                                                   \
    do {                                                             \
        struct kvr_wbuf w_ = {.p = buf, .cap = sizeof buf};          \
        struct kvr_wbuf *w = &w_;                                    \
        call;                                                        \
        if (!w_.err)                                                 \
            save(w_.len);                                            \
    } while (0)

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    static int prompt[300];
    for (int i = 0; i < 300; i++)
        prompt[i] = (i * 37 + 1) % 512;
    for (int pol = 0; pol <= 3; pol++) {
        struct kvr_req_params p = {.req_id = 0x10 + (uint64_t)pol, .begin_no = 1 + (uint64_t)pol,
                                   .n_prompt = 1 + pol * 90, .max_tokens = 100, .temperature = 0.5f,
                                   .top_p = 0.9f, .seed = 7, .stop_at_eos = pol & 1,
                                   .policy = {(enum kvr_kv_policy)pol, 64, pol == 3 ? 4 : 0},
                                   .prefill_rank = 1, .decode_rank = 2, .t_coord_ms = 5.0};
        SEED(kvr_msg_write_req(w, pol & 1 ? KVR_MSG_SEQ_BEGIN : KVR_MSG_PREFILL_REQ, &p, prompt));
    }
    struct kvr_hello h = {.role = KVR_ROLE_DECODE, .colocated = 1, .n_layers = 5, .kv_dim = 32,
                          .block_tokens = 16, .seq_len = 512, .vocab_size = 512, .fingerprint = 99,
                          .kv_bytes_total = 1 << 20, .n_blocks_total = 51, .max_batch = 64,
                          .max_batch_tokens = 512, .n_ctx_max = 1024};
    strcpy(h.host, "host-a");
    SEED(kvr_msg_write_hello(w, &h));
    h.setup_status = KVR_ENOMEM;
    SEED(kvr_msg_write_hello(w, &h));
    struct kvr_node_report r = {.kv_bytes_total = 100, .kv_bytes_used = 10, .kv_bytes_free = 90,
                                .n_blocks_total = 10, .n_blocks_free = 9, .running = 1};
    SEED(kvr_msg_write_status(w, &r));
    struct kvr_tok_event ev[5];
    for (int i = 0; i < 5; i++)
        ev[i] = (struct kvr_tok_event){.req_id = 16 + (uint64_t)i, .token = i, .n_generated = i + 1};
    ev[4].finish = KVR_FINISH_ERROR;
    ev[4].status = KVR_EINVAL;
    ev[4].token = -1;
    ev[4].reason = "decode step failed";
    ev[4].reason_len = 18;
    SEED(kvr_msg_write_tokens(w, ev, 1));
    SEED(kvr_msg_write_tokens(w, ev, 5));
    struct kvr_prefill_done d = {.status = KVR_EUNAVAIL, .n_prompt = 4, .reason = "gone", .reason_len = 4};
    SEED(kvr_msg_write_prefill_done(w, 17, &d));
    SEED(kvr_msg_write_empty(w, KVR_MSG_CANCEL, 17));
    SEED(kvr_msg_write_empty(w, KVR_MSG_PING, 0));
    SEED(kvr_msg_write_reset(w, 3));
    static const unsigned char wire[40] = {0x4b, 0x56};
    SEED(kvr_msg_write_kv(w, 17, 2, wire, sizeof wire));
    struct kvr_seq_ready sr = {.begin_no = 2, .first_token = 5, .rng = 11, .n_kv_msgs = 3};
    SEED(kvr_msg_write_seq_ready(w, 17, &sr));
    struct kvr_seq_abort sa = {.begin_no = 2, .status = KVR_ECHECKSUM, .reason = "bad block", .reason_len = 9};
    SEED(kvr_msg_write_seq_abort(w, 17, &sa));
    printf("%d seeds in %s\n", n_files, dir);
    return 0;
}
