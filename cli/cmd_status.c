/* cmd_status.c - `kvrelay status`: a running cluster's nodes, KV memory and queues, from
 * the coordinator's ClusterStatus RPC; a table, or one JSON object with --json. */
#include <stddef.h>
#include <stdio.h>

#include "cli.h"
#include "grpc_client.h"
#include "json.h"
#include "options.h"
#include "status.h"

struct status_cfg {
    const char *addr;
    struct kvr_cli_conn conn;
    int json;
    float timeout;
};

/* clang-format off */
static const struct kvr_opt status_opts[] = {
    {"addr", KVR_OPT_STRING, offsetof(struct status_cfg, addr), "127.0.0.1:50051", 0, -1, NULL, 0, "coordinator address HOST:PORT"},
    KVR_CLI_CONN_OPTS(struct status_cfg),
    {"json", KVR_OPT_FLAG, offsetof(struct status_cfg, json), "0", 0, -1, NULL, 0, "print one JSON object"},
    {"timeout", KVR_OPT_FLOAT, offsetof(struct status_cfg, timeout), "10", 0, 1e7, NULL, 0, "deadline in seconds (0 = none)"},
};
/* clang-format on */

static void print_json(const struct coord_cluster_status *s) {
    fputs("{\"nodes\":[", stdout);
    for (int i = 0; i < s->n_nodes; i++) {
        const struct coord_node_status *n = &s->nodes[i];
        printf("%s{\"rank\":%d,\"role\":", i ? "," : "", n->rank);
        kvr_json_write_string(stdout, n->role);
        fputs(",\"host\":", stdout);
        kvr_json_write_string(stdout, n->host);
        printf(
            ",\"alive\":%s,\"kv_bytes_total\":%llu,\"kv_bytes_used\":%llu,\"kv_bytes_free\":%llu,"
            "\"kv_bytes_reserved\":%llu,\"running\":%d,\"queued\":%d,\"queued_prompt_tokens\":%llu,"
            "\"report_age_ms\":%.1f,\"state\":",
            n->alive ? "true" : "false", (unsigned long long)n->kv_bytes_total,
            (unsigned long long)n->kv_bytes_used, (unsigned long long)n->kv_bytes_free,
            (unsigned long long)n->kv_bytes_reserved, n->running, n->queued,
            (unsigned long long)n->queued_prompt_tokens, n->report_age_ms);
        kvr_json_write_string(stdout, n->state);
        fputs("}", stdout);
    }
    printf("],\"waiting_requests\":%d,\"running_requests\":%d,\"finished_requests\":%llu,"
           "\"seq_len\":%d,\"vocab_size\":%d,\"decode_target\":%d,\"decode_min\":%d,"
           "\"decode_max\":%d,\"autoscale\":%s,\"last_decision\":",
           s->waiting_requests, s->running_requests, (unsigned long long)s->finished_requests,
           s->seq_len, s->vocab_size, s->decode_desired, s->decode_min, s->decode_max,
           s->autoscale ? "true" : "false");
    kvr_json_write_string(stdout, s->last_decision);
    fputs("}\n", stdout);
}

static void print_table(const struct coord_cluster_status *s) {
    printf("%4s  %-8s %-20s %-5s %-8s %10s %10s %10s %10s %7s %6s\n", "RANK", "ROLE", "HOST",
           "ALIVE", "STATE", "KV_USED", "KV_FREE", "KV_TOTAL", "RESERVED", "RUNNING", "QUEUED");
    for (int i = 0; i < s->n_nodes; i++) {
        const struct coord_node_status *n = &s->nodes[i];
        char used[32], freeb[32], total[32], resv[32];
        printf("%4d  %-8s %-20s %-5s %-8s %10s %10s %10s %10s %7d %6d\n", n->rank, n->role,
               n->host, n->alive ? "yes" : "no", n->state, kvr_format_size(n->kv_bytes_used, used, sizeof used),
               kvr_format_size(n->kv_bytes_free, freeb, sizeof freeb),
               kvr_format_size(n->kv_bytes_total, total, sizeof total),
               kvr_format_size(n->kv_bytes_reserved, resv, sizeof resv), n->running, n->queued);
    }
    printf("requests: %d waiting, %d running, %llu finished; model context %d, vocab %d\n",
           s->waiting_requests, s->running_requests, (unsigned long long)s->finished_requests,
           s->seq_len, s->vocab_size);
    if (s->autoscale)
        printf("decode pool: target %d, autoscaler on [%d, %d]\n", s->decode_desired, s->decode_min,
               s->decode_max);
    else
        printf("decode pool: target %d, autoscaler off\n", s->decode_desired);
    if (s->last_decision[0])
        printf("last decision: %s\n", s->last_decision);
}

int kvr_cmd_status(int argc, char **argv) {
    struct status_cfg cfg;
    int done;
    int ex = kvr_cli_parse(
        "status", "Shows a running cluster's nodes, KV memory and request queues.", status_opts,
        (int)(sizeof status_opts / sizeof status_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    struct kvr_client *client = NULL;
    int cex = kvr_cli_connect("status", cfg.addr, &cfg.conn, &client);
    if (cex != KVR_EXIT_OK)
        return cex;
    struct coord_cluster_status s;
    struct kvr_rpc_status st;
    kvr_client_cluster_status(client, cfg.timeout, &s, &st);
    kvr_client_free(client);
    if (st.code != 0) {
        fprintf(stderr, "kvrelay status: %s: %s\n", kvr_grpc_code_name(st.code), st.message);
        coord_cluster_status_deinit(&s);
        return st.reached ? KVR_EXIT_REJECTED : KVR_EXIT_UNREACHABLE;
    }
    if (cfg.json)
        print_json(&s);
    else
        print_table(&s);
    coord_cluster_status_deinit(&s);
    return KVR_EXIT_OK;
}
