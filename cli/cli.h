/* cli.h - subcommands of the `kvrelay` command and the exit codes they share.
 * Exit codes: 0 success; 1 runtime failure (unreadable or invalid model/tokenizer file,
 * I/O, a node or server error); 2 bad usage or rejected input (unknown option, bad
 * value, prompt longer than the context); 3 the server refused or failed the request
 * (submit: gRPC status other than OK, printed with its code); 4 cannot reach the server. */
#ifndef KVR_CLI_H
#define KVR_CLI_H

enum kvr_exit {
    KVR_EXIT_OK = 0,
    KVR_EXIT_RUNTIME = 1,
    KVR_EXIT_USAGE = 2,
    KVR_EXIT_REJECTED = 3,
    KVR_EXIT_UNREACHABLE = 4,
};

/* Each takes argv after the subcommand name (argv[0] is the subcommand). */
int kvr_cmd_generate(int argc, char **argv);
int kvr_cmd_ppl(int argc, char **argv);
int kvr_cmd_synth_model(int argc, char **argv);
int kvr_cmd_bench(int argc, char **argv);
int kvr_cmd_up(int argc, char **argv);
int kvr_cmd_submit(int argc, char **argv);
int kvr_cmd_status(int argc, char **argv);
int kvr_cmd_scale(int argc, char **argv);
int kvr_cmd_drain(int argc, char **argv);

/* How submit and status reach a coordinator that uses TLS or tokens (docs/API.md). */
struct kvr_cli_conn {
    int tls;
    const char *tls_ca;
    const char *tls_server_name;
    const char *tls_cert;
    const char *tls_key;
    const char *auth_token_file;
};

/* Option-table rows for a struct kvr_cli_conn field named `conn` in cfg type T. */
/* clang-format off */
#define KVR_CLI_CONN_OPTS(T)                                                                                 \
    {"tls", KVR_OPT_FLAG, offsetof(T, conn.tls), "0", 0, -1, NULL, 0, "use TLS (implied by --tls-ca)"},     \
    {"tls-ca", KVR_OPT_STRING, offsetof(T, conn.tls_ca), NULL, 0, -1, NULL, 0,                               \
     "PEM CA certificates to trust (default: the system's roots)"},                                         \
    {"tls-server-name", KVR_OPT_STRING, offsetof(T, conn.tls_server_name), NULL, 0, -1, NULL, 0,             \
     "name the server certificate must carry (default: the host of --addr)"},                              \
    {"tls-cert", KVR_OPT_STRING, offsetof(T, conn.tls_cert), NULL, 0, -1, NULL, 0,                           \
     "PEM client certificate, for servers that require one (with --tls-key)"},                             \
    {"tls-key", KVR_OPT_STRING, offsetof(T, conn.tls_key), NULL, 0, -1, NULL, 0, "PEM key of --tls-cert"}, \
    {"auth-token-file", KVR_OPT_STRING, offsetof(T, conn.auth_token_file), NULL, 0, -1, NULL, 0,             \
     "file holding the bearer token to send (its first token line)"}
/* clang-format on */

struct kvr_client;
/* Opens the client for `kvrelay <cmd>`; on failure prints "kvrelay <cmd>: <reason>" and
 * returns KVR_EXIT_USAGE (bad address or option) or KVR_EXIT_RUNTIME (unreadable file). */
int kvr_cli_connect(const char *cmd, const char *addr, const struct kvr_cli_conn *conn,
                    struct kvr_client **out);

/* Parses argv with table into cfg; on --help prints usage and returns 0 with *done = 1;
 * on error prints "kvrelay <cmd>: <reason>" and returns KVR_EXIT_USAGE with *done = 1. */
struct kvr_opt;
int kvr_cli_parse(const char *cmd, const char *summary, const struct kvr_opt *table, int n_opts,
                  void *cfg, int argc, char **argv, int *done);

#endif /* KVR_CLI_H */
