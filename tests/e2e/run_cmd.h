/* run_cmd.h - runs a product executable for end-to-end tests and captures its exit code,
 * stdout and stderr (through temporary files, so no pipe can fill up and block). */
#ifndef KVR_TEST_RUN_CMD_H
#define KVR_TEST_RUN_CMD_H

#include <stddef.h>

struct cmd_result {
    int exit_code; /* the process's exit status, or 128 + signal when it was killed */
    int signaled;  /* 1 when killed by a signal (a crash, or the timeout) */
    int timed_out; /* 1 when run_cmd killed it after timeout_s */
    char *out;     /* stdout, NUL-terminated; owned */
    size_t out_len;
    char *err; /* stderr, NUL-terminated; owned */
    size_t err_len;
};

/* Runs argv[0] with argv (NULL-terminated) and the caller's environment minus every
 * KVR_* variable (so options cannot leak in from the shell running the tests), in its own
 * process group. Waits for it; after timeout_s seconds its whole process group is killed
 * (SIGKILL) and it is reported as timed out, so a
 * hang fails the test with a message instead of ctest's silent timeout. Returns 0, or
 * -1 when it could not be started (printed to stderr). */
int run_cmd(char *const argv[], int timeout_s, struct cmd_result *r);

void cmd_result_free(struct cmd_result *r);

/* Number of lines of s (a last line without '\n' counts). */
int count_lines(const char *s);

/* Copies the last non-empty line of s (without '\n') into buf. Returns buf. */
char *last_line(const char *s, char *buf, size_t len);

/* Path of build/bin/<name> (KVR_BIN_DIR). Static buffer. */
const char *bin_path(const char *name);

#endif /* KVR_TEST_RUN_CMD_H */
