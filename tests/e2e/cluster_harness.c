/* cluster_harness.c - real clusters for end-to-end tests (see cluster_harness.h). */
#include "cluster_harness.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int harness_free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

int cluster_start(struct cluster *c, double timeout_s, const char *const *extra) {
    memset(c, 0, sizeof *c);
    c->port = harness_free_port();
    snprintf(c->addr, sizeof c->addr, "127.0.0.1:%d", c->port);
    char bin[1024], model[1024], tok[1024], port[16];
    snprintf(bin, sizeof bin, "%s/kvrelay", KVR_BIN_DIR);
    snprintf(model, sizeof model, "%s/models/stories260K.bin", KVR_SHARED_DIR);
    snprintf(tok, sizeof tok, "%s/models/tok512.bin", KVR_SHARED_DIR);
    snprintf(port, sizeof port, "%d", c->port);
    const char *argv[64] = {bin, "up", "--model", model, "--tokenizer", tok, "--port", port};
    int n = 8;
    for (int i = 0; extra && extra[i] && n < 63; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    int pfd[2];
    if (pipe(pfd) != 0)
        return -1;
    c->pid = fork();
    if (c->pid < 0)
        return -1;
    if (c->pid == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execv(bin, (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    close(pfd[1]);
    c->out_fd = pfd[0];
    fprintf(stderr, "harness: started kvrelay up (pid %d) on port %d\n", (int)c->pid, c->port);
    char buf[4096];
    size_t len = 0;
    double t_end = now_s() + timeout_s;
    while (now_s() < t_end) {
        struct pollfd p = {.fd = c->out_fd, .events = POLLIN};
        if (poll(&p, 1, 200) > 0) {
            ssize_t k = read(c->out_fd, buf + len, sizeof buf - 1 - len);
            if (k <= 0)
                break; /* it exited */
            len += (size_t)k;
            buf[len] = '\0';
            if (strstr(buf, "ready at")) {
                fprintf(stderr, "harness: %s", buf);
                return 0;
            }
        }
    }
    fprintf(stderr, "harness: the cluster did not get ready in %.0f s (stdout: %.*s)\n", timeout_s, (int)len, buf);
    cluster_stop(c, 15);
    return -1;
}

int cluster_stop(struct cluster *c, double timeout_s) {
    if (c->pid <= 0)
        return -1;
    kill(c->pid, SIGTERM);
    double t_end = now_s() + timeout_s;
    int st = 0;
    while (now_s() < t_end) {
        pid_t w = waitpid(c->pid, &st, WNOHANG);
        if (w == c->pid) {
            c->pid = 0;
            if (c->out_fd > 0)
                close(c->out_fd);
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        }
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "harness: kvrelay up did not stop in %.0f s; killing\n", timeout_s);
    kill(c->pid, SIGKILL);
    waitpid(c->pid, &st, 0);
    c->pid = 0;
    if (c->out_fd > 0)
        close(c->out_fd);
    return -1;
}

/* Parent pid of pid from /proc, or -1. */
static pid_t parent_of(pid_t pid) {
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *rp = strrchr(buf, ')');
    int ppid = -1;
    if (!rp || sscanf(rp + 2, "%*c %d", &ppid) != 1)
        return -1;
    return (pid_t)ppid;
}

int cluster_pids(const struct cluster *c, const char *prog, pid_t *pids, int max) {
    static const char *progs[] = {"kvrelay-coordinator", "kvrelay-prefill", "kvrelay-decode"};
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) && n < max) {
        pid_t pid = (pid_t)atoi(e->d_name);
        if (pid <= 0)
            continue;
        char path[64], exe[1024];
        snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
        ssize_t k = readlink(path, exe, sizeof exe - 1);
        if (k <= 0)
            continue;
        exe[k] = '\0';
        const char *base = strrchr(exe, '/');
        base = base ? base + 1 : exe;
        int match = 0;
        for (int i = 0; i < 3; i++)
            if (!strcmp(base, progs[i]) && (!prog || !strcmp(prog, progs[i])))
                match = 1;
        if (!match)
            continue;
        /* Ours if `kvrelay up` (c->pid) is an ancestor. */
        pid_t p = pid;
        for (int depth = 0; depth < 8 && p > 1; depth++) {
            p = parent_of(p);
            if (p == c->pid) {
                pids[n++] = pid;
                break;
            }
        }
    }
    closedir(d);
    return n;
}
