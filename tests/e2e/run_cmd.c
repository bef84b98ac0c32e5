/* run_cmd.c - spawns product executables for the end-to-end tests (see run_cmd.h). */
#include "run_cmd.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static char *slurp(int fd, size_t *len) {
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    lseek(fd, 0, SEEK_SET);
    for (;;) {
        if (n + 1 >= cap) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                return NULL;
            }
            buf = grown;
            cap *= 2;
        }
        ssize_t k = read(fd, buf + n, cap - n - 1);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

int run_cmd(char *const argv[], int timeout_s, struct cmd_result *r) {
    memset(r, 0, sizeof *r);
    char out_path[] = "/tmp/kvr_test_out_XXXXXX", err_path[] = "/tmp/kvr_test_err_XXXXXX";
    int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
    int rc = -1;
    size_t n_env = 0;
    while (environ[n_env])
        n_env++;
    char **env = calloc(n_env + 1, sizeof *env);
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t attr;
    int have_fa = 0, have_attr = 0;
    if (out_fd < 0 || err_fd < 0 || !env) {
        fprintf(stderr, "run_cmd: cannot create capture files: %s\n", strerror(errno));
        goto out;
    }
    /* The product's own variables stay out of the child (a test sets what it means to),
     * except the kernel choice: a test run under KVR_KERNEL compares its in-process
     * engine with the commands it runs, which must use the same kernels. */
    size_t k = 0;
    for (size_t i = 0; i < n_env; i++)
        if (strncmp(environ[i], "KVR_", 4) != 0 || strncmp(environ[i], "KVR_KERNEL=", 11) == 0)
            env[k++] = environ[i];
    env[k] = NULL;
    if (posix_spawn_file_actions_init(&fa) != 0)
        goto out;
    have_fa = 1;
    posix_spawn_file_actions_adddup2(&fa, out_fd, STDOUT_FILENO);
    posix_spawn_file_actions_adddup2(&fa, err_fd, STDERR_FILENO);
    /* Its own process group: a timeout kills it and everything it started. */
    if (posix_spawnattr_init(&attr) != 0)
        goto out;
    have_attr = 1;
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setpgroup(&attr, 0);
    pid_t pid;
    int e = posix_spawn(&pid, argv[0], &fa, &attr, argv, env);
    if (e != 0) {
        fprintf(stderr, "run_cmd: cannot start %s: %s\n", argv[0], strerror(e));
        goto out;
    }
    /* Poll every 5 ms: a hang guard, not a measurement. */
    int status = 0;
    long waited_ms = 0;
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid)
            break;
        if (w < 0 && errno != EINTR) {
            fprintf(stderr, "run_cmd: waitpid: %s\n", strerror(errno));
            goto out;
        }
        if (!r->timed_out && waited_ms >= (long)timeout_s * 1000) {
            fprintf(stderr, "run_cmd: %s %s did not finish in %d s: killed\n", argv[0],
                    argv[1] ? argv[1] : "", timeout_s);
            kill(-pid, SIGKILL);
            r->timed_out = 1;
        }
        struct timespec ts = {0, 5 * 1000 * 1000};
        nanosleep(&ts, NULL);
        waited_ms += 5;
    }
    if (WIFSIGNALED(status)) {
        r->signaled = 1;
        r->exit_code = 128 + WTERMSIG(status);
    } else {
        r->exit_code = WEXITSTATUS(status);
    }
    r->out = slurp(out_fd, &r->out_len);
    r->err = slurp(err_fd, &r->err_len);
    if (!r->out || !r->err) {
        cmd_result_free(r);
        goto out;
    }
    rc = 0;
out:
    if (have_fa)
        posix_spawn_file_actions_destroy(&fa);
    if (have_attr)
        posix_spawnattr_destroy(&attr);
    free(env);
    if (out_fd >= 0) {
        close(out_fd);
        unlink(out_path);
    }
    if (err_fd >= 0) {
        close(err_fd);
        unlink(err_path);
    }
    return rc;
}

void cmd_result_free(struct cmd_result *r) {
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

int count_lines(const char *s) {
    int n = 0;
    for (const char *p = s; *p; p++)
        if (*p == '\n')
            n++;
    size_t len = strlen(s);
    if (len && s[len - 1] != '\n')
        n++;
    return n;
}

char *last_line(const char *s, char *buf, size_t len) {
    size_t end = strlen(s);
    while (end > 0 && s[end - 1] == '\n')
        end--;
    size_t begin = end;
    while (begin > 0 && s[begin - 1] != '\n')
        begin--;
    size_t n = end - begin < len - 1 ? end - begin : len - 1;
    memcpy(buf, s + begin, n);
    buf[n] = '\0';
    return buf;
}

const char *bin_path(const char *name) {
    static char buf[1024];
    snprintf(buf, sizeof buf, "%s/%s", KVR_BIN_DIR, name);
    return buf;
}
