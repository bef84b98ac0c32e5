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

/* Parses argv with table into cfg; on --help prints usage and returns 0 with *done = 1;
 * on error prints "kvrelay <cmd>: <reason>" and returns KVR_EXIT_USAGE with *done = 1. */
struct kvr_opt;
int kvr_cli_parse(const char *cmd, const char *summary, const struct kvr_opt *table, int n_opts,
                  void *cfg, int argc, char **argv, int *done);

#endif /* KVR_CLI_H */
