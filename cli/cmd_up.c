/* cmd_up.c - `kvrelay up`: starts a local cluster (one MPMD mpirun: a coordinator,
 * P prefill nodes, D decode nodes, each under kvrelay-guard), waits until its Health RPC
 * says serving, prints the address, and on Ctrl-C/SIGTERM/SIGHUP stops it in order and
 * exits with the job's real status: 0 only if every rank exited 0 (cli/guard.c records
 * each one; mpirun's own status says nothing under --enable-recovery). Signals are read
 * from a signalfd, so none is lost between a check and a wait. If `kvrelay up` dies, the
 * kernel kills mpirun (PR_SET_PDEATHSIG) and the guards and ranks follow it. */
#define _GNU_SOURCE /* signalfd, prctl */
#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
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
    int decode_max;
    const char *mpirun_args;
    int port;
    int http_port;
    const char *host;
    uint64_t kv_memory;
    int colocated;
    int threads;
    int max_batch;
    const char *kv_dtype;
    const char *kv_type;
    float queue_timeout;
    float node_timeout;
    float startup_timeout;
    float stop_timeout;
    float max_request_age;
    const char *mpirun;
    const char *extra_prefill;
    const char *extra_decode;
    const char *log_level;
    const char *weights;
    const char *extra_coord;
    const char *tls_cert;
    const char *tls_key;
    const char *tls_ca;
    const char *tls_server_name;
    const char *auth_token_file;
    int context;
};

static const struct kvr_opt up_opts[] = {
    {"model", KVR_OPT_STRING, offsetof(struct up_cfg, model), NULL, 0, -1, NULL, 1, "model file: GGUF (llama architecture; F32, F16, BF16, Q8_0) or llama2.c checkpoint"},
    {"tokenizer", KVR_OPT_STRING, offsetof(struct up_cfg, tokenizer), NULL, 0, -1, NULL, 0, "tokenizer.bin (llama2.c; or a GGUF file's vocabulary); default: the GGUF model's own"},
    {"context", KVR_OPT_INT, offsetof(struct up_cfg, context), "0", 0, KVR_MODEL_CTX_MAX, NULL, 0, "context length in tokens for every node (0 = the model file's)"},
    {"prefill", KVR_OPT_INT, offsetof(struct up_cfg, prefill), "1", 0, 256, NULL, 0, "prefill nodes (0 needs --colocated)"},
    {"decode", KVR_OPT_INT, offsetof(struct up_cfg, decode), "1", 1, 256, NULL, 0, "decode nodes"},
    {"decode-max", KVR_OPT_INT, offsetof(struct up_cfg, decode_max), "0", 0, 256, NULL, 0, "above --decode: the autoscaler grows the decode pool up to this many nodes (spawned into the running job) and shrinks it back to --decode (0 = fixed pool; kvrelay scale can still grow it up to --decode)"},
    {"mpirun-args", KVR_OPT_STRING, offsetof(struct up_cfg, mpirun_args), "", 0, -1, NULL, 0, "extra options for mpirun (space-separated), e.g. --ompi-server file:URI for nodes that join from jobs of their own"},
    {"port", KVR_OPT_INT, offsetof(struct up_cfg, port), "50051", 1, 65535, NULL, 0, "gRPC port of the coordinator"},
    {"http-port", KVR_OPT_INT, offsetof(struct up_cfg, http_port), "8000", 0, 65535, NULL, 0, "HTTP port of the coordinator (OpenAI API, /health, /metrics) on --host; 0: no HTTP"},
    {"host", KVR_OPT_STRING, offsetof(struct up_cfg, host), "127.0.0.1", 0, -1, NULL, 0, "address the coordinator listens on (0.0.0.0: every interface), prints and checks health on"},
    {"kv-memory", KVR_OPT_SIZE, offsetof(struct up_cfg, kv_memory), "256MiB", 1, -1, NULL, 0, "KV block pool of each decode node"},
    {"colocated", KVR_OPT_FLAG, offsetof(struct up_cfg, colocated), "0", 0, -1, NULL, 0, "decode nodes also prefill (no KV transfer; needs --prefill 0)"},
    {"threads", KVR_OPT_INT, offsetof(struct up_cfg, threads), "0", 0, 1024, NULL, 0, "compute threads per node (0 = CPUs / nodes, at least 1)"},
    {"max-batch", KVR_OPT_INT, offsetof(struct up_cfg, max_batch), "64", 1, 4096, NULL, 0, "sequences per decode step"},
    {"kv-type", KVR_OPT_STRING, offsetof(struct up_cfg, kv_type), "f32", 0, -1, NULL, 0, "KV-cache element type of every rank: f32 (exact), f16, bf16 (half the memory per token; f16/bf16 blocks ship as their own values)"},
    {"kv-dtype", KVR_OPT_STRING, offsetof(struct up_cfg, kv_dtype), "f32", 0, -1, NULL, 0, "value type of shipped KV blocks: f32 (lossless), f16, bf16"},
    {"queue-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, queue_timeout), "30", 0.01, 86400, NULL, 0, "seconds a request may wait for KV memory"},
    {"node-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, node_timeout), "10", 0.2, 86400, NULL, 0, "seconds of silence after which a node is dead"},
    {"startup-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, startup_timeout), "600", 1, 86400, NULL, 0, "seconds to wait for the cluster to become healthy"},
    {"stop-timeout", KVR_OPT_FLOAT, offsetof(struct up_cfg, stop_timeout), "15", 1, 86400, NULL, 0, "seconds the ranks get to stop cleanly after Ctrl-C/SIGTERM before they are killed (and up exits 1)"},
    {"max-request-age", KVR_OPT_FLOAT, offsetof(struct up_cfg, max_request_age), "3600", 0.1, 31536000, NULL, 0, "seconds after which the coordinator ends any request (DEADLINE_EXCEEDED)"},
    {"mpirun", KVR_OPT_STRING, offsetof(struct up_cfg, mpirun), "mpirun", 0, -1, NULL, 0, "the MPI launcher"},
    {"prefill-args", KVR_OPT_STRING, offsetof(struct up_cfg, extra_prefill), "", 0, -1, NULL, 0, "extra options for every kvrelay-prefill (space-separated)"},
    {"coordinator-args", KVR_OPT_STRING, offsetof(struct up_cfg, extra_coord), "", 0, -1, NULL, 0, "extra options for kvrelay-coordinator (space-separated)"},
    {"tls-cert", KVR_OPT_STRING, offsetof(struct up_cfg, tls_cert), NULL, 0, -1, NULL, 0, "PEM certificate of the coordinator: serve gRPC over TLS (with --tls-key)"},
    {"tls-key", KVR_OPT_STRING, offsetof(struct up_cfg, tls_key), NULL, 0, -1, NULL, 0, "PEM private key of --tls-cert"},
    {"tls-ca", KVR_OPT_STRING, offsetof(struct up_cfg, tls_ca), NULL, 0, -1, NULL, 0, "PEM CA the health probe trusts (default: --tls-cert itself, right for a self-signed one)"},
    {"tls-server-name", KVR_OPT_STRING, offsetof(struct up_cfg, tls_server_name), NULL, 0, -1, NULL, 0, "name in the certificate, if not --host"},
    {"auth-token-file", KVR_OPT_STRING, offsetof(struct up_cfg, auth_token_file), NULL, 0, -1, NULL, 0, "bearer tokens clients must send (see kvrelay-coordinator --help)"},
    {"decode-args", KVR_OPT_STRING, offsetof(struct up_cfg, extra_decode), "", 0, -1, NULL, 0, "extra options for every kvrelay-decode (space-separated)"},
    {"weights", KVR_OPT_STRING, offsetof(struct up_cfg, weights), "auto", 0, -1, NULL, 0, "how nodes hold the weights: mmap (shared page cache), copy (huge pages, one copy per node) or auto (copy for a node alone on its host: never on one machine with several nodes)"},
    {"log-level", KVR_OPT_STRING, offsetof(struct up_cfg, log_level), "warn", 0, -1, NULL, 0, "log level of the nodes: error, warn, info, debug"},
};

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

/* ---------------------------------------------------------------------------------------
 * The job: signals through a signalfd, ranks' fates through kvrelay-guard's status files.
 * ------------------------------------------------------------------------------------- */

/* Signals up waits for. They are blocked for the whole command (so none is lost between a
 * check and a wait) and read from a signalfd; mpirun gets the old mask back before exec. */
static const int up_signals[] = {SIGINT, SIGTERM, SIGHUP, SIGCHLD};

/* Waits up to timeout_ms (-1: forever) for a signal. Returns its number, or 0 on timeout. */
static int wait_signal(int sfd, int timeout_ms) {
    struct pollfd p = {.fd = sfd, .events = POLLIN};
    int k = poll(&p, 1, timeout_ms);
    if (k <= 0)
        return 0;
    struct signalfd_siginfo si;
    if (read(sfd, &si, sizeof si) != (ssize_t)sizeof si)
        return 0;
    return (int)si.ssi_signo;
}

static const char *describe(int st, char *buf, size_t len) {
    if (WIFEXITED(st))
        snprintf(buf, len, "exit code %d", WEXITSTATUS(st));
    else
        snprintf(buf, len, "signal %d (%s)", WTERMSIG(st), strsignal(WTERMSIG(st)));
    return buf;
}

/* Stops the job: SIGUSR1 to mpirun, which forwards it to every kvrelay-guard (each turns
 * it into SIGTERM for its rank) and, unlike with SIGTERM, waits for the ranks instead of
 * killing them after a second. mpirun forwards a signal only to the processes it has
 * already started, so during start-up a single SIGUSR1 can miss ranks launched just
 * after it: it is sent again every second until mpirun exits (a rank that already stops
 * only hears it again). After grace_s, or at a second stop signal, SIGKILL to mpirun: the
 * guards and ranks follow it (PR_SET_PDEATHSIG). Returns mpirun's status. */
static int stop_job(pid_t pid, int sfd, double grace_s) {
    int st = 0;
    double t_end = kvr_clock_now() + grace_s, t_next = 0;
    for (;;) {
        if (waitpid(pid, &st, WNOHANG) == pid)
            return st;
        double now = kvr_clock_now();
        if (now >= t_next) {
            kill(pid, SIGUSR1);
            t_next = now + 1.0;
        }
        double left = t_end - now;
        if (left <= 0) {
            fprintf(stderr, "kvrelay up: the cluster did not stop in %.0f s; killing it\n", grace_s);
            break;
        }
        double wait_s = left < t_next - now ? left : t_next - now;
        int sig = wait_signal(sfd, (int)(wait_s * 1000.0) + 1);
        if (sig && sig != SIGCHLD) {
            fprintf(stderr, "kvrelay up: second stop signal; killing the cluster\n");
            break;
        }
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return st;
}

/* Reads the guards' status files. Prints one line per rank that did not exit 0 (or left
 * no status: it or its guard was killed) and returns how many; expected_names: (n_ranks)
 * the program each rank runs, for ranks without a file. */
static int report_ranks(const char *dir, int n_ranks, const char *const *names) {
    int bad = 0;
    for (int r = 0; r < n_ranks; r++) {
        char path[4200], line[512] = "";
        snprintf(path, sizeof path, "%s/rank-%d", dir, r);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(line, sizeof line, f))
                line[0] = '\0';
            fclose(f);
        }
        int rank = -1, code = -1;
        char prog[256], how[16];
        if (sscanf(line, "%d %255s %15s %d", &rank, prog, how, &code) != 4 || rank != r) {
            fprintf(stderr, "kvrelay up: rank %d (%s) left no exit status (killed with its guard)\n", r,
                    names[r]);
            bad++;
            continue;
        }
        if (!strcmp(how, "exit") && code == 0)
            continue;
        bad++;
        if (!strcmp(how, "signal"))
            fprintf(stderr, "kvrelay up: rank %d (%s) was killed by signal %d (%s)\n", r, prog, code,
                    strsignal(code));
        else
            fprintf(stderr, "kvrelay up: rank %d (%s) exited with code %d\n", r, prog, code);
    }
    return bad;
}

static void remove_dir(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
                continue;
            char path[4400];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
}

/* Status directories that earlier runs left behind: a `kvrelay up` that was SIGKILLed
 * (the one end that cannot remove its own) leaves <tmp>/kvrelay-up.<pid>.XXXXXX; each
 * run removes those whose pid no longer exists. A live pid (or one of another user's,
 * EPERM) is left alone; files it may not remove stay, as before. */
static void sweep_stale_dirs(const char *tmp) {
    DIR *d = opendir(tmp);
    if (!d)
        return;
    struct dirent *e;
    while ((e = readdir(d))) {
        long pid = 0;
        int end = 0;
        if (sscanf(e->d_name, "kvrelay-up.%ld.%n", &pid, &end) != 1 || end == 0 || strlen(e->d_name + end) != 6 ||
            pid <= 0 || (pid_t)pid == getpid())
            continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH)
            continue;
        char path[4400];
        snprintf(path, sizeof path, "%s/%s", tmp, e->d_name);
        remove_dir(path);
    }
    closedir(d);
}

/* A client for the readiness probe: Health needs no token, but TLS needs a CA. */
static int probe_client(const struct up_cfg *cfg, const char *addr, struct kvr_client **out) {
    struct kvr_client_opts o = {.tls = cfg->tls_cert != NULL,
                                .tls_ca_file = cfg->tls_ca ? cfg->tls_ca : cfg->tls_cert,
                                .tls_server_name = cfg->tls_server_name};
    return kvr_client_create_opts(addr, &o, out, NULL, 0);
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
    if (strcmp(cfg.kv_type, "f32") && strcmp(cfg.kv_type, "f16") && strcmp(cfg.kv_type, "bf16")) {
        fprintf(stderr, "kvrelay up: --kv-type must be f32, f16 or bf16\n");
        return KVR_EXIT_USAGE;
    }
    if (strcmp(cfg.kv_type, "f32") && strcmp(cfg.kv_dtype, "f32") && strcmp(cfg.kv_dtype, cfg.kv_type)) {
        fprintf(stderr, "kvrelay up: --kv-dtype %s conflicts with --kv-type %s (an %s cache ships %s values)\n",
                cfg.kv_dtype, cfg.kv_type, cfg.kv_type, cfg.kv_type);
        return KVR_EXIT_USAGE;
    }
    if (strcmp(cfg.weights, "mmap") && strcmp(cfg.weights, "copy") && strcmp(cfg.weights, "auto")) {
        fprintf(stderr, "kvrelay up: --weights must be mmap, copy or auto\n");
        return KVR_EXIT_USAGE;
    }
    if (!cfg.tls_cert != !cfg.tls_key) {
        fprintf(stderr, "kvrelay up: --tls-cert and --tls-key go together\n");
        return KVR_EXIT_USAGE;
    }
    if ((cfg.tls_ca || cfg.tls_server_name) && !cfg.tls_cert) {
        fprintf(stderr, "kvrelay up: --tls-ca and --tls-server-name need --tls-cert and --tls-key\n");
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
    struct kvr_model_params mp = {.n_ctx = cfg.context};
    int lrc = kvr_model_load_params(cfg.model, &mp, &model);
    if (lrc == KVR_OK)
        lrc = kvr_model_load_tokenizer(model, cfg.tokenizer, &tok);
    if (lrc != KVR_OK) {
        fprintf(stderr, "kvrelay up: cannot serve %s with %s: %s\n", cfg.model,
                cfg.tokenizer ? cfg.tokenizer : "its own tokenizer", kvr_status_str(lrc));
        int usage = model && !cfg.tokenizer && kvr_model_config(model)->format == KVR_MODEL_LLAMA2C;
        kvr_model_free(model);
        return usage ? KVR_EXIT_USAGE : KVR_EXIT_RUNTIME;
    }
    kvr_tokenizer_free(tok);
    kvr_model_free(model);
    char dir[4096], coord_bin[4200], prefill_bin[4200], decode_bin[4200], guard_bin[4200];
    if (bin_dir(dir, sizeof dir) != KVR_OK) {
        fprintf(stderr, "kvrelay up: cannot find my own directory\n");
        return KVR_EXIT_RUNTIME;
    }
    snprintf(coord_bin, sizeof coord_bin, "%s/kvrelay-coordinator", dir);
    snprintf(prefill_bin, sizeof prefill_bin, "%s/kvrelay-prefill", dir);
    snprintf(decode_bin, sizeof decode_bin, "%s/kvrelay-decode", dir);
    snprintf(guard_bin, sizeof guard_bin, "%s/kvrelay-guard", dir);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    int nodes = cfg.prefill + cfg.decode;
    int threads = cfg.threads ? cfg.threads : (int)(ncpu / nodes > 0 ? ncpu / nodes : 1);
    char kv_mem[32];
    snprintf(kv_mem, sizeof kv_mem, "%llu", (unsigned long long)cfg.kv_memory);
    if (cfg.decode_max && cfg.decode_max < cfg.decode) {
        fprintf(stderr, "kvrelay up: --decode-max %d is below --decode %d\n", cfg.decode_max, cfg.decode);
        return KVR_EXIT_USAGE;
    }
    /* The guards record each rank's end here (see cli/guard.c). */
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    char status_dir[4096];
    sweep_stale_dirs(tmp);
    snprintf(status_dir, sizeof status_dir, "%s/kvrelay-up.%ld.XXXXXX", tmp, (long)getpid());
    if (!mkdtemp(status_dir)) {
        fprintf(stderr, "kvrelay up: cannot create a directory in %s: %s\n", tmp, strerror(errno));
        return KVR_EXIT_RUNTIME;
    }
    char *extra_p = strdup(cfg.extra_prefill), *extra_d = strdup(cfg.extra_decode);
    char *extra_c = strdup(cfg.extra_coord), *extra_m = strdup(cfg.mpirun_args);
    char listen[300];
    snprintf(listen, sizeof listen, "%s:%d", cfg.host, cfg.port);
    struct argv_buf *a = calloc(1, sizeof *a);
    const char **names = calloc((size_t)nodes + 1, sizeof *names);
    /* The decode node the coordinator spawns when the pool grows: the same command line
     * as the job's own decode nodes (one string, split on spaces by the coordinator),
     * without a guard (a spawned guard would write rank 0's status file). */
    char *spawn = malloc(8192);
    struct kvr_client *client = NULL;
    int sfd = -1;
    sigset_t set, old_mask;
    sigemptyset(&set);
    for (size_t i = 0; i < sizeof up_signals / sizeof up_signals[0]; i++)
        sigaddset(&set, up_signals[i]);
    sigprocmask(SIG_BLOCK, &set, &old_mask);
    if (!extra_p || !extra_d || !extra_c || !extra_m || !a || !names || !spawn) {
        ex = KVR_EXIT_RUNTIME;
        goto out;
    }
    char spawn_ctx[40] = "";
    if (cfg.context)
        snprintf(spawn_ctx, sizeof spawn_ctx, " --context %ld", (long)cfg.context);
    snprintf(spawn, 8192, "%s --model %s%s --threads %d --kv-memory %s --kv-type %s --weights %s --max-batch %d%s %s", decode_bin,
             cfg.model, spawn_ctx, threads, kv_mem, cfg.kv_type, cfg.weights, cfg.max_batch, cfg.colocated ? " --colocated" : "",
             cfg.extra_decode);
    names[0] = "kvrelay-coordinator";
    for (int r = 1; r <= nodes; r++)
        names[r] = r <= cfg.prefill ? "kvrelay-prefill" : "kvrelay-decode";
    /* One MPMD job. --oversubscribe: more ranks than cores is the normal case on a laptop
     * or CI box; --enable-recovery: a node that dies does not take the job down (the
     * coordinator notices its silence and re-runs its requests elsewhere). Every rank runs
     * under kvrelay-guard, which records how it ended. */
    arg(a, cfg.mpirun);
    arg(a, "--oversubscribe");
    arg(a, "--enable-recovery");
    arg(a, "--bind-to");
    arg(a, "none");
    /* Debian's Open MPI otherwise opens the cm pml and probes PSM drivers: MPI_Init takes
     * ~230 ms instead of ~30 (../shared/notes/elastic-mpi.md), most of a spawned decode
     * node's join. One machine uses ob1 (shared memory) either way. */
    arg(a, "--mca");
    arg(a, "pml");
    arg(a, "ob1");
    words(a, extra_m);
    arg(a, "-x");
    arg(a, "KVR_LOG_LEVEL");
    arg(a, "-np");
    arg(a, "1");
    arg(a, guard_bin);
    arg(a, status_dir);
    arg(a, coord_bin);
    arg(a, "--model");
    arg(a, cfg.model);
    if (cfg.tokenizer) {
        arg(a, "--tokenizer");
        arg(a, cfg.tokenizer);
    }
    if (cfg.context) {
        arg(a, "--context");
        arg(a, fmt(a, "%ld", cfg.context));
    }
    arg(a, "--kv-type");
    arg(a, cfg.kv_type);
    arg(a, "--listen");
    arg(a, listen);
    arg(a, "--http-listen");
    if (cfg.http_port > 0 && a->n_strs < 64 && strlen(cfg.host) < 48) {
        char *hl = a->strs[a->n_strs++];
        snprintf(hl, sizeof a->strs[0], "%s:%d", cfg.host, cfg.http_port);
        arg(a, hl);
    } else {
        arg(a, "off");
    }
    arg(a, "--queue-timeout");
    arg(a, fmt_s(a, cfg.queue_timeout));
    arg(a, "--node-timeout");
    arg(a, fmt_s(a, cfg.node_timeout));
    arg(a, "--startup-timeout");
    arg(a, fmt_s(a, cfg.startup_timeout));
    arg(a, "--max-request-age");
    arg(a, fmt_s(a, cfg.max_request_age));
    if (cfg.tls_cert) {
        arg(a, "--tls-cert");
        arg(a, cfg.tls_cert);
        arg(a, "--tls-key");
        arg(a, cfg.tls_key);
    }
    if (cfg.auth_token_file) {
        arg(a, "--auth-token-file");
        arg(a, cfg.auth_token_file);
    }
    arg(a, "--decode-spawn");
    arg(a, spawn);
    if (cfg.decode_max > cfg.decode) {
        arg(a, "--decode-min");
        arg(a, fmt(a, "%ld", cfg.decode));
    }
    arg(a, "--decode-max");
    arg(a, fmt(a, "%ld", cfg.decode_max > cfg.decode ? cfg.decode_max : cfg.decode));
    words(a, extra_c);
    if (cfg.prefill > 0) {
        arg(a, ":");
        arg(a, "-np");
        arg(a, fmt(a, "%ld", cfg.prefill));
        arg(a, guard_bin);
        arg(a, status_dir);
        arg(a, prefill_bin);
        arg(a, "--model");
        arg(a, cfg.model);
        if (cfg.context) {
            arg(a, "--context");
            arg(a, fmt(a, "%ld", cfg.context));
        }
        arg(a, "--threads");
        arg(a, fmt(a, "%ld", threads));
        arg(a, "--kv-type");
        arg(a, cfg.kv_type);
        arg(a, "--kv-dtype");
        arg(a, cfg.kv_dtype);
        arg(a, "--weights");
        arg(a, cfg.weights);
        words(a, extra_p);
    }
    arg(a, ":");
    arg(a, "-np");
    arg(a, fmt(a, "%ld", cfg.decode));
    arg(a, guard_bin);
    arg(a, status_dir);
    arg(a, decode_bin);
    arg(a, "--model");
    arg(a, cfg.model);
    if (cfg.context) {
        arg(a, "--context");
        arg(a, fmt(a, "%ld", cfg.context));
    }
    arg(a, "--threads");
    arg(a, fmt(a, "%ld", threads));
    arg(a, "--kv-memory");
    arg(a, kv_mem);
    arg(a, "--kv-type");
    arg(a, cfg.kv_type);
    arg(a, "--weights");
    arg(a, cfg.weights);
    arg(a, "--max-batch");
    arg(a, fmt(a, "%ld", cfg.max_batch));
    if (cfg.colocated)
        arg(a, "--colocated");
    words(a, extra_d);

    if ((sfd = signalfd(-1, &set, SFD_CLOEXEC)) < 0) {
        fprintf(stderr, "kvrelay up: signalfd: %s\n", strerror(errno));
        ex = KVR_EXIT_RUNTIME;
        goto out;
    }
    setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
    setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
    setenv("KVR_LOG_LEVEL", cfg.log_level, 1);
    pid_t me = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "kvrelay up: fork: %s\n", strerror(errno));
        ex = KVR_EXIT_RUNTIME;
        goto out;
    }
    if (pid == 0) {
        /* Its own process group: a terminal's Ctrl-C reaches only us, and we stop the
         * job in order. If we die (even by SIGKILL), the kernel kills mpirun, and the
         * guards and ranks follow it (cli/guard.c). */
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, &old_mask, NULL);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != me)
            _exit(127);
        execvp(a->v[0], a->v);
        fprintf(stderr, "kvrelay up: cannot run %s: %s\n", a->v[0], strerror(errno));
        _exit(127);
    }
    setpgid(pid, pid);
    char addr[300];
    snprintf(addr, sizeof addr, "%s:%d", cfg.host, cfg.port);
    fprintf(stderr, "kvrelay up: starting %d prefill and %d decode nodes (%d threads each%s) with %s\n",
            cfg.prefill, cfg.decode, threads, cfg.colocated ? ", colocated" : "", cfg.mpirun);
    double t0 = kvr_clock_now();
    int st = 0, sig = 0, exited = 0, ready = 0;
    while (!sig) {
        if (waitpid(pid, &st, WNOHANG) == pid) {
            char how[80];
            fprintf(stderr, "kvrelay up: the cluster exited before it was ready (mpirun: %s)\n",
                    describe(st, how, sizeof how));
            exited = 1;
            break;
        }
        /* A fresh channel per probe: a channel that failed to connect waits out gRPC's
         * reconnect backoff (seconds) before trying again. */
        int serving = 0;
        struct kvr_rpc_status rs;
        kvr_client_free(client);
        client = NULL;
        if (probe_client(&cfg, addr, &client) == KVR_OK &&
            kvr_client_health(client, 1.0, &serving, NULL, 0, &rs) == 0 && serving)
            break;
        if (kvr_clock_now() - t0 > (double)cfg.startup_timeout) {
            fprintf(stderr, "kvrelay up: not healthy after %.0f s; stopping it\n", (double)cfg.startup_timeout);
            stop_job(pid, sfd, 10.0);
            report_ranks(status_dir, nodes + 1, names);
            ex = KVR_EXIT_RUNTIME;
            goto out;
        }
        int s = wait_signal(sfd, 100);
        if (s != SIGCHLD)
            sig = s;
    }
    if (!sig && !exited) {
        ready = 1;
        char http[96] = "";
        if (cfg.http_port > 0)
            snprintf(http, sizeof http, ", HTTP at http://%s:%d", cfg.host, cfg.http_port);
        printf("kvrelay up: ready at %s%s (%d prefill, %d decode%s) in %.1f s; Ctrl-C stops it\n", addr, http,
               cfg.prefill, cfg.decode, cfg.colocated ? ", colocated" : "", kvr_clock_now() - t0);
        fflush(stdout);
        kvr_client_free(client);
        client = NULL;
        /* Serving: wait for a stop signal or for the job to end on its own. */
        while (!sig) {
            int s = wait_signal(sfd, -1);
            if (s == SIGCHLD) {
                if (waitpid(pid, &st, WNOHANG) == pid) {
                    char how[80];
                    fprintf(stderr, "kvrelay up: the cluster exited by itself (mpirun: %s)\n",
                            describe(st, how, sizeof how));
                    exited = 1;
                    break;
                }
            } else if (s) {
                sig = s;
            }
        }
    }
    if (sig) {
        fprintf(stderr, "kvrelay up: %s: stopping the cluster\n", strsignal(sig));
        st = stop_job(pid, sfd, (double)cfg.stop_timeout);
    }
    /* The job's real status: every rank must have exited 0 (mpirun's own status says
     * nothing under --enable-recovery), and a job that ended without being asked to, or
     * never served, has failed whatever its ranks say (a rank stopped while it was still
     * in MPI_Init dies of SIGTERM anyway). */
    int bad = report_ranks(status_dir, nodes + 1, names);
    if (exited || bad || !ready) {
        fprintf(stderr, "kvrelay up: the cluster %s%s\n",
                exited ? "ended without being stopped" : ready ? "stopped" : "was stopped before it was ready",
                bad ? ", not every rank exited cleanly" : "");
        ex = KVR_EXIT_RUNTIME;
    } else {
        fprintf(stderr, "kvrelay up: stopped; every rank exited cleanly\n");
        ex = KVR_EXIT_OK;
    }
out:
    kvr_client_free(client);
    if (sfd >= 0)
        close(sfd);
    sigprocmask(SIG_SETMASK, &old_mask, NULL);
    remove_dir(status_dir);
    free(names);
    free(extra_p);
    free(extra_d);
    free(extra_c);
    free(extra_m);
    free(spawn);
    free(a);
    return ex;
}
