/* cmd_submit.c - `kvrelay submit`: sends one prompt to a coordinator and streams the answer.
 * Text mode prints exactly what llama2.c's run prints for the same request (the prompt,
 * each piece as it arrives, a newline); --json prints one object per line (docs/API.md). */
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "grpc_client.h"
#include "json.h"
#include "kv_cache.h"
#include "options.h"
#include "status.h"

struct submit_cfg {
    const char *addr;
    struct kvr_cli_conn conn;
    const char *prompt;
    const char *prompt_tokens;
    int max_tokens;
    float temperature;
    float top_p;
    uint64_t seed;
    int kv_policy;
    int kv_window;
    int kv_sinks;
    int ignore_eos;
    int json;
    float timeout;
};

/* clang-format off */
static const struct kvr_opt submit_opts[] = {
    {"addr", KVR_OPT_STRING, offsetof(struct submit_cfg, addr), "127.0.0.1:50051", 0, -1, NULL, 0, "coordinator address HOST:PORT"},
    KVR_CLI_CONN_OPTS(struct submit_cfg),
    {"prompt", KVR_OPT_STRING, offsetof(struct submit_cfg, prompt), NULL, 0, -1, NULL, 0, "prompt text"},
    {"prompt-tokens", KVR_OPT_STRING, offsetof(struct submit_cfg, prompt_tokens), NULL, 0, -1, NULL, 0, "prompt as token ids \"1,403,407\" instead of text (BOS added if missing)"},
    {"max-tokens", KVR_OPT_INT, offsetof(struct submit_cfg, max_tokens), "0", 0, 1 << 24, NULL, 0, "tokens to generate at most (0 = up to the model's context)"},
    {"temperature", KVR_OPT_FLOAT, offsetof(struct submit_cfg, temperature), "1.0", 0, 1e6, NULL, 0, "0 = greedy"},
    {"top-p", KVR_OPT_FLOAT, offsetof(struct submit_cfg, top_p), "0.9", 0, 1, NULL, 0, "nucleus sampling threshold (0 or 1 = off)"},
    {"seed", KVR_OPT_U64, offsetof(struct submit_cfg, seed), "0", 0, -1, NULL, 0, "random seed (0 = chosen by the server)"},
    {"kv-policy", KVR_OPT_CHOICE, offsetof(struct submit_cfg, kv_policy), "dense", 0, -1, KVR_KV_POLICY_CHOICES, 0, "KV-cache policy"},
    {"kv-window", KVR_OPT_INT, offsetof(struct submit_cfg, kv_window), "0", 0, 1 << 22, NULL, 0, "L: tokens attended (window, recompute, sink); 0 = server default"},
    {"kv-sinks", KVR_OPT_INT, offsetof(struct submit_cfg, kv_sinks), "-1", -1, 1 << 20, NULL, 0, "S: attention-sink tokens kept (sink); -1 = server default"},
    {"ignore-eos", KVR_OPT_FLAG, offsetof(struct submit_cfg, ignore_eos), "0", 0, -1, NULL, 0, "do not stop at BOS/EOS: generate exactly --max-tokens tokens"},
    {"json", KVR_OPT_FLAG, offsetof(struct submit_cfg, json), "0", 0, -1, NULL, 0, "one JSON object per line: prompt, tokens, done (or error)"},
    {"timeout", KVR_OPT_FLOAT, offsetof(struct submit_cfg, timeout), "0", 0, 1e7, NULL, 0, "deadline of the whole request in seconds (0 = none)"},
};
/* clang-format on */

struct submit_out {
    int json;
    int printed; /* text mode: something went to stdout (the line needs its newline) */
};

static int on_message(void *ud, const struct kvr_gen_msg *m) {
    struct submit_out *o = ud;
    if (o->json) {
        if (m->prompt_text) {
            fputs("{\"type\":\"prompt\",\"text\":", stdout);
            kvr_json_write_string(stdout, m->prompt_text);
            fputs("}\n", stdout);
        }
        if (m->has_token) {
            printf("{\"type\":\"token\",\"index\":%d,\"token_id\":%d,\"text\":", m->index,
                   m->token_id);
            kvr_json_write_string(stdout, m->text);
            fputs("}\n", stdout);
        }
        if (m->done) {
            const struct kvr_gen_usage *u = m->done;
            printf("{\"type\":\"done\",\"finish_reason\":\"%s\",\"prompt_tokens\":%d,"
                   "\"generated_tokens\":%d,\"queue_ms\":%.3f,\"ttft_ms\":%.3f,\"tpot_ms\":%.3f,"
                   "\"total_ms\":%.3f,\"prefill_rank\":%d,\"decode_rank\":%d,\"seed\":%llu}\n",
                   kvr_gen_finish_name(u->finish_reason), u->prompt_tokens, u->generated_tokens,
                   u->queue_ms, u->ttft_ms, u->tpot_ms, u->total_ms, u->prefill_rank,
                   u->decode_rank, (unsigned long long)u->seed);
        }
    } else {
        if (m->prompt_text && m->prompt_text[0]) {
            fputs(m->prompt_text, stdout);
            o->printed = 1;
        }
        if (m->has_token && m->text[0]) {
            fputs(m->text, stdout);
            o->printed = 1;
        }
    }
    fflush(stdout);
    return 0;
}

/* Parses "1,403 407" into a malloc'd array. Returns 0, or -1 with a reason in err. */
static int parse_ids(const char *s, int **out, int *n_out, char *err, size_t err_len) {
    size_t cap = strlen(s) / 2 + 1;
    int *ids = malloc(cap * sizeof *ids);
    int n = 0;
    if (!ids) {
        snprintf(err, err_len, "out of memory");
        return -1;
    }
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        if (!*p)
            break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < INT_MIN || v > INT_MAX || (size_t)n >= cap) {
            snprintf(err, err_len, "--prompt-tokens: bad token id near '%.20s'", p);
            free(ids);
            return -1;
        }
        ids[n++] = (int)v;
        p = end;
    }
    if (n == 0) {
        snprintf(err, err_len, "--prompt-tokens: no token ids");
        free(ids);
        return -1;
    }
    *out = ids;
    *n_out = n;
    return 0;
}

int kvr_cmd_submit(int argc, char **argv) {
    struct submit_cfg cfg;
    int done;
    int ex = kvr_cli_parse("submit",
                           "Sends a prompt to a kvrelay coordinator and streams the answer "
                           "(stdout as llama2.c's run prints it; --json for JSON lines).",
                           submit_opts, (int)(sizeof submit_opts / sizeof submit_opts[0]), &cfg,
                           argc, argv, &done);
    if (done)
        return ex;
    if (!cfg.prompt && !cfg.prompt_tokens) {
        fprintf(stderr, "kvrelay submit: give --prompt TEXT or --prompt-tokens IDS\n");
        return KVR_EXIT_USAGE;
    }
    if (cfg.prompt && cfg.prompt_tokens) {
        fprintf(stderr, "kvrelay submit: give --prompt or --prompt-tokens, not both\n");
        return KVR_EXIT_USAGE;
    }
    int *ids = NULL, n_ids = 0;
    char err[160];
    if (cfg.prompt_tokens && parse_ids(cfg.prompt_tokens, &ids, &n_ids, err, sizeof err) != 0) {
        fprintf(stderr, "kvrelay submit: %s\n", err);
        return KVR_EXIT_USAGE;
    }

    struct kvr_client *client = NULL;
    int cex = kvr_cli_connect("submit", cfg.addr, &cfg.conn, &client);
    if (cex != KVR_EXIT_OK) {
        free(ids);
        return cex;
    }
    struct kvr_gen_params p = {
        .prompt = cfg.prompt,
        .prompt_tokens = ids,
        .n_prompt_tokens = n_ids,
        .max_tokens = cfg.max_tokens,
        .temperature = cfg.temperature,
        .top_p = cfg.top_p,
        .seed = cfg.seed,
        .ignore_eos = cfg.ignore_eos,
        .kv_policy = cfg.kv_policy,
        .kv_window = cfg.kv_window,
        .kv_sinks = cfg.kv_sinks,
        .timeout_s = cfg.timeout,
    };
    struct submit_out o = {.json = cfg.json};
    struct kvr_gen_usage u;
    struct kvr_rpc_status st;
    kvr_client_generate(client, &p, on_message, &o, &u, &st);
    kvr_client_free(client);
    free(ids);

    if (st.code == 0) {
        if (!cfg.json) {
            fputs("\n", stdout);
            fflush(stdout);
            fprintf(stderr,
                    "finish=%s prompt_tokens=%d generated_tokens=%d queue_ms=%.1f ttft_ms=%.1f "
                    "tpot_ms=%.2f total_ms=%.1f prefill_rank=%d decode_rank=%d seed=%llu\n",
                    kvr_gen_finish_name(u.finish_reason), u.prompt_tokens, u.generated_tokens,
                    u.queue_ms, u.ttft_ms, u.tpot_ms, u.total_ms, u.prefill_rank, u.decode_rank,
                    (unsigned long long)u.seed);
        }
        return KVR_EXIT_OK;
    }
    if (cfg.json) {
        printf("{\"type\":\"error\",\"code\":\"%s\",\"message\":", kvr_grpc_code_name(st.code));
        kvr_json_write_string(stdout, st.message);
        fputs("}\n", stdout);
    } else if (o.printed) {
        fputs("\n", stdout);
    }
    fflush(stdout);
    fprintf(stderr, "kvrelay submit: %s: %s\n", kvr_grpc_code_name(st.code), st.message);
    return st.reached ? KVR_EXIT_REJECTED : KVR_EXIT_UNREACHABLE;
}
