/* cmd_up.c - `kvrelay up`: starts a local cluster (one MPMD mpirun: a coordinator,
 * P prefill nodes, D decode nodes), waits until its Health RPC says serving, prints the
 * address, and stops it cleanly on Ctrl-C/SIGTERM (SIGTERM to mpirun, which forwards
 * it to every rank; SIGKILL to the process group if that does not end it). */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "clock.h"
#include "grpc_client.h"
#include "kv_cache.h"
#include "log.h"
#include "model.h"
#include "options.h"
#include "status.h"
#include "tokenizer.h"

struct up_cfg {
    const char *model;
    const char *tokenizer;
    int prefill;
    int decode;
    int port;
    const char *host;
    uint64_t kv_memory;
    int colocated;
    int threads;
    int max_batch;
    const char *kv_dtype;
    float queue_timeout;
    float node_timeout;
    float startup_timeout;
    const char *mpirun;
    const char *extra_prefill;
    const char *extra_decode;
    const char *log_level;
    const char *weights;
};

static const struct kvr_opt up_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct up_cfg, model), NULL, 0, -1, NULL, 1, "checkpoint (llama2.c format)"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct up_cfg, tokenizer), NULL, 0, -1, NULL, 1, "tokenizer.bin of the model"},
    {"prefill", KVR_OPT_INT, offsetof(struct up_cfg, prefill), "1", 0, 256, NULL, 0, "prefill nodes (0 needs --colocated)"},
    {"decode", KVR_OPT_INT, offsetof(struct up_cfg, decode), "1", 1, 256, NULL, 0, "decode nodes"},
    {"port", KVR_OPT_INT, offsetof(struct up_cfg, port), "50051", 1, 65535, NULL, 0, "gRPC port of the coordinator"},
    {"host", KVR_OPT_STRING, offsetof(struct up_cfg, host), "127.0.0.1", 0, -1, NULL, 0, "address to print and to check health on"},
    {"kv-memory", KVR_OPT_SIZE, offsetof(struct up_cfg, kv_memory), "256MiB", 1, -1, NULL, 0, "KV block pool of each decode node"},
    {"colocated", KVR_OPT_FLAG, offsetof(struct up_cfg, colocated), "0", 0, -1, NULL, 0, "decode nodes also prefill (no KV transfer; needs --prefill 0)"},
    {"threads", KVR_OPT_INT, offsetof(struct up_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads per node (0 = CPUs / nodes, at least 1)"},
    {"max-batch", KVR_OPT_INT, offsetof(struct up_cfg, max_batch), "64", 1, 4096, NULL, 0, "sequences per decode step"},
    {"kv-dtype", KVR_OPT_STRING, offsetof(struct up_cfg, kv_dtype), "f32", 0, -1, NULL, 0, "value type of shipped KV blocks: f32 (lossless), f16, bf16"},
    {"queue-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, queue_timeout), "30", 0.01, 86400, NULL, 0, "seconds a request may wait for KV memory"},
    {"node-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, node_timeout), "10", 0.2, 86400, NULL, 0, "seconds of silence after which a node is dead"},
    {"startup-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, startup_timeout), "600", 1, 86400, NULL, 0, "seconds to wait for the cluster to become healthy"},
    {"mpirun", KVR_OPT_STRING, offsetof(struct up_cfg, mpirun), "mpirun", 0, -1, NULL, 0, "the MPI launcher"},
    {"prefill-args", KVR_OPT_STRING, offsetof(struct up_cfg, extra_prefill), "", 0, -1, NULL, 0, "extra options for every kvrelay-prefill (space-separated)"},
    {"decode-args", KVR_OPT_STRING, offsetof(struct up_cfg, extra_decode), "", 0, -1, NULL, 0, "extra options for every kvrelay-decode (space-separated)"},
    {"weights", KVR_OPT_STRING, offsetof(struct up_cfg, weights), "auto", 0, -1, NULL, 0, "how nodes hold the weights: mmap (shared page cache), copy (huge pages, one copy per node) or auto (copy for a node alone on its host: never on one machine with several nodes)"},
    {"log-level", KVR_OPT_STRING, offsetof(struct up_cfg, log_level), "warn", 0, -1, NULL, 0, "log level of the nodes: error, warn, info, debug"},
};

static volatile sig_atomic_t up_signal;

static void on_signal(int sig) { up_signal = sig; }

/* argv under construction: fixed capacity, strings owned by the caller or by `strs`. */
struct argv_buf {
    char *v[512];
    int n;
    char strs[64][64];
    int n_strs;
};

static void arg(struct argv_buf *a, const char *s) {
    if (a->n < 511)
        a->v[a->n++] = (char *)(uintptr_t)s;
    a->v[a->n] = NULL;
}

static const char *fmt(struct argv_buf *a, const char *f, long v) {
    if (a->n_strs >= 64)
        return "";
    char *s = a->strs[a->n_strs++];
    snprintf(s, 64, f, v);
    return s;
}

/* A seconds option passed on as given (the nodes take fractions too). */
static const char *fmt_s(struct argv_buf *a, float v) {
    if (a->n_strs >= 64)
        return "";
    char *s = a->strs[a->n_strs++];
    snprintf(s, 64, "%g", (double)v);
    return s;
}

/* Appends the words of a space-separated string (modified in place). */
static void words(struct argv_buf *a, char *s) {
    for (char *tok = strtok(s, " "); tok; tok = strtok(NULL, " "))
        arg(a, tok);
}

static int bin_dir(char *out, size_t len) {
    ssize_t n = readlink("/proc/self/exe", out, len - 1);
    if (n <= 0)
        return KVR_EIO;
    out[n] = '\0';
    char *slash = strrchr(out, '/');
    if (!slash)
        return KVR_EIO;
    *slash = '\0';
    return KVR_OK;
}

/* Stops the job: SIGTERM to mpirun (it forwards it to the ranks), then SIGKILL to the
 * whole process group after grace_s. Returns mpirun's exit status. */
static int stop_job(pid_t pid, double grace_s) {
    int st = 0;
    kill(pid, SIGTERM);
    for (double waited = 0; waited < grace_s; waited += 0.1) {
        if (waitpid(pid, &st, WNOHANG) == pid)
            return st;
        kvr_sleep_ms(100);
    }
    fprintf(stderr, "kvrelay up: the cluster did not stop in %.0f s; killing it\n", grace_s);
    kill(-pid, SIGKILL);
    waitpid(pid, &st, 0);
    return st;
}

int kvr_cmd_up(int argc, char **argv) {
    struct up_cfg cfg;
    int done;
    int ex = kvr_cli_parse("up", "Starts a local kvrelay cluster with mpirun and waits until it serves.", up_opts,
                           (int)(sizeof up_opts / sizeof up_opts[0]), &cfg, argc, argv, &done);
    if (done)
        return ex;
    if (cfg.prefill == 0 && !cfg.colocated) {
        fprintf(stderr, "kvrelay up: --prefill 0 needs --colocated (someone has to prefill)\n");
        return KVR_EXIT_USAGE;
    }
    if (cfg.prefill > 0 && cfg.colocated) {
        fprintf(stderr, "kvrelay up: --colocated runs without prefill nodes: pass --prefill 0\n");
        return KVR_EXIT_USAGE;
    }
    if (strcmp(cfg.kv_dtype, "f32") && strcmp(cfg.kv_dtype, "f16") && strcmp(cfg.kv_dtype, "bf16")) {
        fprintf(stderr, "kvrelay up: --kv-dtype must be f32, f16 or bf16\n");
        return KVR_EXIT_USAGE;
    }
    if (strcmp(cfg.weights, "mmap") && strcmp(cfg.weights, "copy") && strcmp(cfg.weights, "auto")) {
        fprintf(stderr, "kvrelay up: --weights must be mmap, copy or auto\n");
        return KVR_EXIT_USAGE;
    }
    if (kvr_log_parse_level(cfg.log_level) < 0) {
        fprintf(stderr, "kvrelay up: --log-level must be error, warn, info or debug\n");
        return KVR_EXIT_USAGE;
    }
    /* Validate the model and tokenizer here (mmap and header checks: cheap), so that a bad
     * file is one clear line instead of every rank failing under mpirun. */
    struct kvr_model *model = NULL;
    struct kvr_tokenizer *tok = NULL;
    int lrc = kvr_model_load(cfg.model, &model);
    if (lrc == KVR_OK)
        lrc = kvr_tokenizer_load(cfg.tokenizer, kvr_model_config(model)->vocab_size, &tok);
    if (lrc != KVR_OK) {
        fprintf(stderr, "kvrelay up: cannot serve %s with %s: %s\n", cfg.model, cfg.tokenizer,
                kvr_status_str(lrc));
        kvr_model_free(model);
        return KVR_EXIT_RUNTIME;
    }
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    char dir[4096], coord_bin[4200], prefill_bin[4200], decode_bin[4200];
    if (bin_dir(dir, sizeof dir) != KVR_OK) {
        fprintf(stderr, "kvrelay up: cannot find my own directory\n");
        return KVR_EXIT_RUNTIME;
    }
    snprintf(coord_bin, sizeof coord_bin, "%s/kvrelay-coordinator", dir);
    snprintf(prefill_bin, sizeof prefill_bin, "%s/kvrelay-prefill", dir);
    snprintf(decode_bin, sizeof decode_bin, "%s/kvrelay-decode", dir);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nodes = cfg.prefill + cfg.decode;
    int threads = cfg.threads ? cfg.threads : (int)(ncpu / nodes > 0 ? ncpu / nodes : 1);
    char kv_mem[32];
    snprintf(kv_mem, sizeof kv_mem, "%llu", (unsigned long long)cfg.kv_memory);
    char *extra_p = strdup(cfg.extra_prefill), *extra_d = strdup(cfg.extra_decode);
    struct argv_buf *a = calloc(1, sizeof *a);
    if (!extra_p || !extra_d || !a) {
        free(extra_p);
        free(extra_d);
        free(a);
        return KVR_EXIT_RUNTIME;
    }
    /* One MPMD job. --oversubscribe: more ranks than cores is the normal case on a laptop
     * or CI box; --enable-recovery: a node that dies does not take the job down (the
     * coordinator notices its silence and re-runs its requests elsewhere). */
    arg(a, cfg.mpirun);
    arg(a, "--oversubscribe");
    arg(a, "--enable-recovery");
    arg(a, "--bind-to");
    arg(a, "none");
    arg(a, "-x");
    arg(a, "KVR_LOG_LEVEL");
    arg(a, "-np");
    arg(a, "1");
    arg(a, coord_bin);
    arg(a, "--model");
    arg(a, cfg.model);
    arg(a, "--tokenizer");
    arg(a, cfg.tokenizer);
    arg(a, "--listen");
    arg(a, fmt(a, "0.0.0.0:%ld", cfg.port));
    arg(a, "--queue-timeout");
    arg(a, fmt_s(a, cfg.queue_timeout));
    arg(a, "--node-timeout");
    arg(a, fmt_s(a, cfg.node_timeout));
    arg(a, "--startup-timeout");
    arg(a, fmt_s(a, cfg.startup_timeout));
    if (cfg.prefill > 0) {
        arg(a, ":");
        arg(a, "-np");
        arg(a, fmt(a, "%ld", cfg.prefill));
        arg(a, prefill_bin);
        arg(a, "--model");
        arg(a, cfg.model);
        arg(a, "--threads");
        arg(a, fmt(a, "%ld", threads));
        arg(a, "--kv-dtype");
        arg(a, cfg.kv_dtype);
        arg(a, "--weights");
        arg(a, cfg.weights);
        words(a, extra_p);
    }
    arg(a, ":");
    arg(a, "-np");
    arg(a, fmt(a, "%ld", cfg.decode));
    arg(a, decode_bin);
    arg(a, "--model");
    arg(a, cfg.model);
    arg(a, "--threads");
    arg(a, fmt(a, "%ld", threads));
    arg(a, "--kv-memory");
    arg(a, kv_mem);
    arg(a, "--weights");
    arg(a, cfg.weights);
    arg(a, "--max-batch");
    arg(a, fmt(a, "%ld", cfg.max_batch));
    if (cfg.colocated)
        arg(a, "--colocated");
    words(a, extra_d);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("KVR_LOG_LEVEL", cfg.log_level, 1);
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "kvrelay up: fork: %s\n", strerror(errno));
        ex = KVR_EXIT_RUNTIME;
        goto out;
    }
    if (pid == 0) {
        /* Its own process group: a terminal's Ctrl-C reaches only us, and we stop the
         * job in order; killpg can still reach every rank. */
        setpgid(0, 0);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        execvp(a->v[0], a->v);
        fprintf(stderr, "kvrelay up: cannot run %s: %s\n", a->v[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    struct kvr_client *client = NULL;
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%d", cfg.host, cfg.port);
    fprintf(stderr, "kvrelay up: starting %d prefill and %d decode nodes (%d threads each%s) with %s\n",
            cfg.prefill, cfg.decode, threads, cfg.colocated ? ", colocated" : "", cfg.mpirun);
    double t0 = kvr_clock_now();
    int st = 0, ready = 0;
    while (!up_signal) {
        if (waitpid(pid, &st, WNOHANG) == pid) {
            fprintf(stderr, "kvrelay up: the cluster exited before it was ready (%s %d)\n",
                    WIFEXITED(st) ? "exit code" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            ex = KVR_EXIT_RUNTIME;
            goto out;
        }
        /* A fresh channel per probe: a channel that failed to connect waits out gRPC's
         * reconnect backoff (seconds) before trying again. */
        int serving = 0;
        struct kvr_rpc_status rs;
        kvr_client_free(client);
        client = NULL;
        if (kvr_client_create(addr, &client) == KVR_OK &&
            kvr_client_health(client, 1.0, &serving, NULL, 0, &rs) == 0 && serving) {
            ready = 1;
            break;
        }
        if (kvr_clock_now() - t0 > (double)cfg.startup_timeout) {
            fprintf(stderr, "kvrelay up: not healthy after %.0f s; stopping it\n", (double)cfg.startup_timeout);
            stop_job(pid, 10.0);
            ex = KVR_EXIT_RUNTIME;
            goto out;
        }
        kvr_sleep_ms(100);
    }
    if (ready) {
        printf("kvrelay up: ready at %s (%d prefill, %d decode%s) in %.1f s; Ctrl-C stops it\n", addr, cfg.prefill,
               cfg.decode, cfg.colocated ? ", colocated" : "", kvr_clock_now() - t0);
        fflush(stdout);
    }
    while (!up_signal) {
        pid_t w = waitpid(pid, &st, 0);
        if (w == pid) {
            fprintf(stderr, "kvrelay up: the cluster exited (%s %d)\n", WIFEXITED(st) ? "exit code" : "signal",
                    WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            ex = WIFEXITED(st) && WEXITSTATUS(st) == 0 ? KVR_EXIT_OK : KVR_EXIT_RUNTIME;
            goto out;
        }
        if (w < 0 && errno != EINTR)
            break;
    }
    fprintf(stderr, "kvrelay up: stopping the cluster\n");
    st = stop_job(pid, 15.0);
    ex = KVR_EXIT_OK;
out:
    kvr_client_free(client);
    free(extra_p);
    free(extra_d);
    free(a);
    return ex;
}
