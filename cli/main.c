/* main.c - `kvrelay`: the one command a person types; dispatches to subcommands. */
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "grpc_client.h"
#include "log.h"
#include "options.h"
#include "status.h"

static const struct {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"generate", kvr_cmd_generate, "run the model in this process and print a continuation"},
    {"ppl", kvr_cmd_ppl, "teacher-forced perplexity of a text under a KV-cache policy"},
    {"synth-model", kvr_cmd_synth_model, "write a random-weight checkpoint of any shape"},
    {"bench", kvr_cmd_bench, "benchmarks (engine, kvwire, cluster); --json for JSON"},
    {"up", kvr_cmd_up, "start a local cluster (coordinator, prefill and decode nodes)"},
    {"submit", kvr_cmd_submit, "send a prompt to a coordinator and stream the answer"},
    {"status", kvr_cmd_status, "show a cluster's nodes and KV memory"},
    {"scale", kvr_cmd_scale, "set a running cluster's decode pool size"},
    {"drain", kvr_cmd_drain, "drain one decode node of a running cluster"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: kvrelay <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\n`kvrelay <command> --help` lists a command's options.\n");
}

int kvr_cli_parse(const char *cmd, const char *summary, const struct kvr_opt *table, int n_opts,
                  void *cfg, int argc, char **argv, int *done) {
    char err[256];
    char prog[64];
    snprintf(prog, sizeof prog, "kvrelay %s", cmd);
    int rc = kvr_opts_parse(table, n_opts, cfg, argc, argv, 1, err, sizeof err);
    if (rc == 1) {
        kvr_opts_usage(stdout, prog, summary, table, n_opts);
        *done = 1;
        return KVR_EXIT_OK;
    }
    if (rc != KVR_OK) {
        fprintf(stderr, "%s: %s\n", prog, err);
        *done = 1;
        return KVR_EXIT_USAGE;
    }
    *done = 0;
    kvr_opts_log(prog, table, n_opts, cfg);
    return KVR_EXIT_OK;
}

int kvr_cli_connect(const char *cmd, const char *addr, const struct kvr_cli_conn *conn,
                    struct kvr_client **out) {
    char token[4200] = "", err[512] = "";
    if (!conn->tls_cert != !conn->tls_key) {
        fprintf(stderr, "kvrelay %s: --tls-cert and --tls-key go together\n", cmd);
        return KVR_EXIT_USAGE;
    }
    if (conn->auth_token_file && kvr_client_read_token(conn->auth_token_file, token, sizeof token,
                                                       err, sizeof err) != KVR_OK) {
        fprintf(stderr, "kvrelay %s: %s\n", cmd, err);
        return KVR_EXIT_RUNTIME;
    }
    struct kvr_client_opts o = {.tls = conn->tls,
                                .tls_ca_file = conn->tls_ca,
                                .tls_server_name = conn->tls_server_name,
                                .tls_cert_file = conn->tls_cert,
                                .tls_key_file = conn->tls_key,
                                .token = token[0] ? token : NULL};
    int rc = kvr_client_create_opts(addr, &o, out, err, sizeof err);
    memset(token, 0, sizeof token);
    if (rc != KVR_OK) {
        fprintf(stderr, "kvrelay %s: %s\n", cmd, err[0] ? err : "cannot use that address");
        return rc == KVR_EIO ? KVR_EXIT_RUNTIME : KVR_EXIT_USAGE;
    }
    return KVR_EXIT_OK;
}

int main(int argc, char **argv) {
    kvr_log_init("cli", -1);
    if (argc < 2) {
        usage(stderr);
        return KVR_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return KVR_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kvrelay: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return KVR_EXIT_USAGE;
}
