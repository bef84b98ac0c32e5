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
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MARK_VAR "KVRTEST_CLUSTER"
#define MAX_LIVE 8

/* Clusters started and not yet stopped: the atexit handler takes them down. */
static struct cluster *live[MAX_LIVE];

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void nap_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

int harness_free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in a = {
        .sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

/* Whether process pid carries mark in its environment; its program's base name into exe. */
static int marked(pid_t pid, const char *mark, char *exe, size_t exe_len) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    static char buf[1 << 17];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char want[128];
    int wl = snprintf(want, sizeof want, MARK_VAR "=%s", mark);
    int found = 0;
    for (ssize_t i = 0; i < n;) {
        size_t l = strlen(buf + i);
        if ((int)l == wl && !memcmp(buf + i, want, (size_t)wl))
            found = 1;
        i += (ssize_t)l + 1;
    }
    if (!found)
        return 0;
    exe[0] = '\0';
    snprintf(path, sizeof path, "/proc/%d/exe", (int)pid);
    char full[1024];
    ssize_t k = readlink(path, full, sizeof full - 1);
    if (k > 0) {
        full[k] = '\0';
        const char *base = strrchr(full, '/');
        base = base ? base + 1 : full;
        size_t bl = strlen(base) < exe_len - 1 ? strlen(base) : exe_len - 1;
        memcpy(exe, base, bl);
        exe[bl] = '\0';
    }
    return 1;
}

/* Calls fn for every live process of the cluster (zombies excluded: they are gone). */
static int for_each_proc(const struct cluster *c, void (*fn)(pid_t pid, const char *exe, void *ud),
                         void *ud) {
    DIR *d = opendir("/proc");
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        pid_t pid = (pid_t)atoi(e->d_name);
        if (pid <= 0 || pid == getpid())
            continue;
        char exe[256];
        if (!marked(pid, c->mark, exe, sizeof exe))
            continue;
        char path[64], st[512];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
        FILE *f = fopen(path, "r");
        int zombie = 0;
        if (f) {
            size_t k = fread(st, 1, sizeof st - 1, f);
            st[k] = '\0';
            fclose(f);
            char *rp = strrchr(st, ')');
            zombie = rp && rp[1] == ' ' && rp[2] == 'Z';
        }
        if (zombie)
            continue;
        n++;
        if (fn)
            fn(pid, exe, ud);
    }
    closedir(d);
    return n;
}

int cluster_count_procs(const struct cluster *c) {
    return for_each_proc(c, NULL, NULL);
}

static void print_proc(pid_t pid, const char *exe, void *ud) {
    (void)ud;
    fprintf(stderr, "harness:   left behind: pid %d (%s)\n", (int)pid, exe);
}

static void kill_proc(pid_t pid, const char *exe, void *ud) {
    (void)exe;
    (void)ud;
    kill(pid, SIGKILL);
}

int cluster_wait_gone(const struct cluster *c, double timeout_s) {
    double t_end = now_s() + timeout_s;
    int n;
    while ((n = cluster_count_procs(c)) > 0 && now_s() < t_end)
        nap_ms(20);
    return n;
}

static void forget(struct cluster *c) {
    for (int i = 0; i < MAX_LIVE; i++)
        if (live[i] == c)
            live[i] = NULL;
    if (c->out_fd > 0)
        close(c->out_fd);
    c->out_fd = -1;
}

/* Kills whatever is left of c: its process group, then every marked process. */
static void take_down(struct cluster *c) {
    if (c->pid > 0) {
        kill(-c->pid, SIGKILL);
        int st;
        waitpid(c->pid, &st, 0);
        c->pid = 0;
    }
    if (cluster_wait_gone(c, 10) > 0) {
        for_each_proc(c, print_proc, NULL);
        for_each_proc(c, kill_proc, NULL);
        cluster_wait_gone(c, 5);
    }
    forget(c);
}

static void at_exit_take_down(void) {
    for (int i = 0; i < MAX_LIVE; i++) {
        if (live[i]) {
            fprintf(stderr, "harness: test ended with a cluster running (port %d): killing it\n",
                    live[i]->port);
            take_down(live[i]);
        }
    }
}

static const char *use_model, *use_tokenizer;
static int use_context;

void cluster_use_model(const char *model, const char *tokenizer, int context) {
    use_model = model;
    use_tokenizer = tokenizer;
    use_context = context;
}

int cluster_spawn(struct cluster *c, const char *const *extra) {
    static int registered;
    if (!registered) {
        atexit(at_exit_take_down);
        registered = 1;
    }
    memset(c, 0, sizeof *c);
    c->out_fd = -1;
    c->port = harness_free_port();
    snprintf(c->addr, sizeof c->addr, "127.0.0.1:%d", c->port);
    snprintf(c->mark, sizeof c->mark, "%d.%d", (int)getpid(), c->port);
    char bin[1024], model[1024], tok[1024], port[16], ctx[16];
    /* The copy beside the test builds of the roles: it starts those (fault injection). */
    snprintf(bin, sizeof bin, "%s/kvrelay", KVR_TEST_BIN_DIR);
    snprintf(model, sizeof model, "%s/models/stories260K.bin", KVR_SHARED_DIR);
    snprintf(tok, sizeof tok, "%s/models/tok512.bin", KVR_SHARED_DIR);
    snprintf(port, sizeof port, "%d", c->port);
    snprintf(ctx, sizeof ctx, "%d", use_context);
    /* HTTP on a free port too: kvrelay up's default (8000) may be taken by another cluster. */
    char http_port[16];
    do /* a port just released may be handed out again at once */
        c->http_port = harness_free_port();
    while (c->http_port == c->port);
    snprintf(http_port, sizeof http_port, "%d", c->http_port);
    /* A generous stop timeout: under ASan every rank runs LeakSanitizer at exit, which
     * takes seconds on a loaded machine; a stop that does not finish still fails. */
    const char *argv[64] = {bin,    "up",           "--model",  use_model ? use_model : model,
                            "--port", port,         "--stop-timeout", "90",
                            "--http-port", http_port};
    int n = 10;
    if (!use_model || use_tokenizer) {
        argv[n++] = "--tokenizer";
        argv[n++] = use_model ? use_tokenizer : tok;
    }
    if (use_context > 0) {
        argv[n++] = "--context";
        argv[n++] = ctx;
    }
    for (int i = 0; extra && extra[i] && n < 63; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    int pfd[2];
    if (pipe(pfd) != 0)
        return -1;
    c->pid = fork();
    if (c->pid < 0) {
        c->pid = 0;
        return -1;
    }
    if (c->pid == 0) {
        /* Its own process group, so the harness can kill everything it started at once;
         * and if the test itself dies (a crash, ctest's timeout), the kernel kills up,
         * whose own PR_SET_PDEATHSIG chain then takes the cluster down. */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        setenv(MARK_VAR, c->mark, 1);
        /* Under ASan (scripts/test.sh), LeakSanitizer checks every rank at exit and
         * `kvrelay up` fails the stop if one leaked; the MPI stack's own leaks are
         * suppressed (tests/lsan_mpi.supp explains how they are recognised). */
        const char *asan = getenv("ASAN_OPTIONS");
        static char asan_opts[2048];
        snprintf(asan_opts, sizeof asan_opts, "%s%sfast_unwind_on_malloc=0:malloc_context_size=16",
                 asan ? asan : "", asan && *asan ? ":" : "");
        setenv("ASAN_OPTIONS", asan_opts, 1);
        setenv("LSAN_OPTIONS",
               "suppressions=" KVR_SOURCE_DIR "/tests/lsan_mpi.supp:print_suppressions=0", 1);
        setenv("OMPI_MCA_mca_base_component_disable_dlclose", "1", 1);
        setenv("PMIX_MCA_mca_base_component_disable_dlclose", "1", 1);
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execv(bin, (char *const *)(uintptr_t)argv);
        _exit(127);
    }
    setpgid(c->pid, c->pid);
    for (int i = 0; i < MAX_LIVE; i++) {
        if (!live[i]) {
            live[i] = c;
            break;
        }
    }
    close(pfd[1]);
    c->out_fd = pfd[0];
    fprintf(stderr, "harness: started kvrelay up (pid %d) on port %d\n", (int)c->pid, c->port);
    return 0;
}

int cluster_start(struct cluster *c, double timeout_s, const char *const *extra) {
    if (cluster_spawn(c, extra) != 0)
        return -1;
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
    fprintf(stderr, "harness: the cluster did not get ready in %.0f s (stdout: %.*s)\n", timeout_s,
            (int)len, buf);
    cluster_stop(c, 15);
    return -1;
}

int cluster_wait(struct cluster *c, double timeout_s) {
    if (c->pid <= 0)
        return -1;
    double t_end = now_s() + timeout_s;
    int st = 0;
    while (now_s() < t_end) {
        pid_t w = waitpid(c->pid, &st, WNOHANG);
        if (w == c->pid) {
            c->pid = 0;
            c->exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            return c->exit_code;
        }
        nap_ms(20);
    }
    return -1;
}

int cluster_stop(struct cluster *c, double timeout_s) {
    if (c->pid <= 0) {
        forget(c);
        return -1;
    }
    kill(c->pid, SIGTERM);
    /* up's own --stop-timeout (90 s) bounds the stop; wait a little longer than that. */
    double wait_s = timeout_s > 100 ? timeout_s : 100;
    int code = cluster_wait(c, wait_s);
    if (code < 0) {
        fprintf(stderr, "harness: kvrelay up did not stop in %.0f s; killing its process group\n",
                wait_s);
        take_down(c);
        return -1;
    }
    /* up has exited: every process of the cluster must be gone with it. */
    int left = cluster_wait_gone(c, 10);
    if (left > 0) {
        fprintf(stderr, "harness: kvrelay up exited but %d of its processes did not\n", left);
        take_down(c);
        return -1;
    }
    forget(c);
    return code;
}

struct pid_list {
    const char *prog;
    pid_t *pids;
    int n, max;
};

static void collect_rank(pid_t pid, const char *exe, void *ud) {
    struct pid_list *l = ud;
    static const char *progs[] = {"kvrelay-coordinator", "kvrelay-prefill", "kvrelay-decode"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(exe, progs[i]) && (!l->prog || !strcmp(l->prog, progs[i])) && l->n < l->max)
            l->pids[l->n++] = pid;
}

int cluster_pids(const struct cluster *c, const char *prog, pid_t *pids, int max) {
    struct pid_list l = {.prog = prog, .pids = pids, .n = 0, .max = max};
    for_each_proc(c, collect_rank, &l);
    return l.n;
}

int harness_rank_of(pid_t pid) {
    char path[64];
    /* A decode node spawned into the running cluster names itself kvr-peer-<id>. */
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    FILE *fc = fopen(path, "r");
    if (fc) {
        char comm[32] = "";
        int id = -1;
        if (fgets(comm, sizeof comm, fc) && sscanf(comm, "kvr-peer-%d", &id) == 1) {
            fclose(fc);
            return id;
        }
        fclose(fc);
    }
    snprintf(path, sizeof path, "/proc/%d/environ", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    static char buf[1 << 17];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    for (size_t i = 0; i < n;) {
        if (!strncmp(buf + i, "OMPI_COMM_WORLD_RANK=", 21))
            return atoi(buf + i + 21);
        i += strlen(buf + i) + 1;
    }
    return -1;
}

pid_t cluster_pid_of_rank(const struct cluster *c, int rank) {
    pid_t pids[1024];
    int n = cluster_pids(c, NULL, pids, 1024);
    for (int i = 0; i < n; i++)
        if (harness_rank_of(pids[i]) == rank)
            return pids[i];
    return -1;
}
