/* golden_submit.c - the client side of the deploy tests (emulated hosts, Slurm, the
 * container image): runs N concurrent `kvrelay submit` processes against a coordinator,
 * greedy, each asking for one of the llama2.c reference runs of ../shared/golden, and
 * checks that each one's stdout is that run's text byte for byte (plus the newline
 * `submit` ends with) and that it exited 0. Exit 0 when every stream matched, 1 otherwise.
 *
 *   golden_submit --addr HOST:PORT --kvrelay build/bin/kvrelay [--streams 16]
 *                 [--timeout 120] [--ready-file F] [--model M --tokenizer T]
 *
 * --ready-file F: F is created once every stream has printed its prompt and at least a
 * few tokens, so a test can break something mid-stream (unplug a host, kill a rank) and
 * still demand every text exact. --decode-ranks F: F gets the decode rank that served each
 * stream (from `submit`'s usage line), one per line, so a test can tell which node served
 * (a node that joined later has a higher rank). The prompts' token counts (to ask for exactly llama2.c's
 * number of steps) come from the bundled tokenizer. */
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "golden.h"
#include "model.h"
#include "tokenizer.h"

#define N_GOLDEN_MAX 16
#define N_STREAMS_MAX 256
#define UNCONST(p) ((char *)(uintptr_t)(p)) /* execv's argv is char *const[] */
#define READY_BYTES 24 /* bytes past the prompt: a few tokens of every story */

struct stream {
    int g;          /* golden run */
    pid_t pid;      /* 0 once reaped */
    int status;     /* waitpid status */
    char out[4200]; /* stdout file */
    char err[4200]; /* stderr file */
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (n + 1 < cap)
            break;
        cap *= 2;
        char *grown = realloc(buf, cap);
        if (!grown) {
            free(buf);
            buf = NULL;
        }
        buf = grown;
    }
    fclose(f);
    if (buf)
        buf[n] = '\0';
    *len = n;
    return buf;
}

static off_t file_size(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? st.st_size : 0;
}

static void usage(void) {
    fprintf(stderr, "usage: golden_submit --addr HOST:PORT --kvrelay PATH [--streams N] [--timeout S]\n"
                    "                     [--ready-file F] [--decode-ranks F] [--model M --tokenizer T]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *addr = NULL, *kvrelay = NULL, *ready_file = NULL, *ranks_file = NULL;
    const char *model_path = KVR_SHARED_DIR "/models/stories260K.bin";
    const char *tok_path = KVR_SHARED_DIR "/models/tok512.bin";
    int n_streams = 16;
    double timeout_s = 120;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        if (!strcmp(a, "--addr"))
            addr = argv[++i];
        else if (!strcmp(a, "--kvrelay"))
            kvrelay = argv[++i];
        else if (!strcmp(a, "--streams"))
            n_streams = atoi(argv[++i]);
        else if (!strcmp(a, "--timeout"))
            timeout_s = atof(argv[++i]);
        else if (!strcmp(a, "--ready-file"))
            ready_file = argv[++i];
        else if (!strcmp(a, "--decode-ranks"))
            ranks_file = argv[++i];
        else if (!strcmp(a, "--model"))
            model_path = argv[++i];
        else if (!strcmp(a, "--tokenizer"))
            tok_path = argv[++i];
        else
            usage();
    }
    if (!addr || !kvrelay || n_streams < 1 || n_streams > N_STREAMS_MAX || timeout_s <= 0)
        usage();

    /* The reference runs and their prompt lengths (llama2.c's tokenization, BOS first). */
    char *paths[N_GOLDEN_MAX];
    int n_golden = golden_run_paths(paths, N_GOLDEN_MAX);
    if (n_golden < 5) {
        fprintf(stderr, "golden_submit: expected the 5 golden runs of ../shared/golden, found %d\n", n_golden);
        return 1;
    }
    static struct golden_run golden[N_GOLDEN_MAX];
    int max_tokens[N_GOLDEN_MAX];
    struct kvr_model *m = NULL;
    struct kvr_tokenizer *t = NULL;
    if (kvr_model_load(model_path, &m) != 0 ||
        kvr_tokenizer_load(tok_path, kvr_model_config(m)->vocab_size, &t) != 0) {
        fprintf(stderr, "golden_submit: cannot load %s / %s\n", model_path, tok_path);
        return 1;
    }
    for (int g = 0; g < n_golden; g++) {
        int ids[1024], n = 0;
        if (golden_run_load(paths[g], &golden[g]) != 0 ||
            kvr_tokenizer_encode(t, golden[g].prompt, 1, 0, ids, 1024, &n) != 0)
            return 1;
        free(paths[g]);
        /* run.c forwards positions 0..steps-1 and prints a token after each position
         * from the prompt's last on: steps - n + 1 tokens (fewer if it stopped at BOS,
         * which the server also stops at). */
        max_tokens[g] = golden[g].steps - n + 1;
    }
    kvr_tokenizer_free(t);
    kvr_model_free(m);

    char dir[] = "/tmp/kvr-golden-submit.XXXXXX";
    if (!mkdtemp(dir)) {
        fprintf(stderr, "golden_submit: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    static struct stream s[N_STREAMS_MAX];
    double t0 = now_s();
    for (int i = 0; i < n_streams; i++) {
        s[i].g = i % n_golden;
        snprintf(s[i].out, sizeof s[i].out, "%s/%d.out", dir, i);
        snprintf(s[i].err, sizeof s[i].err, "%s/%d.err", dir, i);
        char mt[32], to[32];
        snprintf(mt, sizeof mt, "%d", max_tokens[s[i].g]);
        snprintf(to, sizeof to, "%g", timeout_s);
        const struct golden_run *g = &golden[s[i].g];
        /* An empty prompt is INVALID_ARGUMENT as text: send its one token, BOS, which is
         * what run.c feeds for it. */
        char *args[] = {UNCONST(kvrelay), "submit", "--addr", UNCONST(addr), "--temperature", "0", "--max-tokens", mt,
                        "--timeout", to, g->prompt[0] ? "--prompt" : "--prompt-tokens",
                        g->prompt[0] ? g->prompt : "1", NULL};
        pid_t pid = fork();
        if (pid < 0) {
            fprintf(stderr, "golden_submit: fork: %s\n", strerror(errno));
            return 1;
        }
        if (pid == 0) {
            int fo = open(s[i].out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            int fe = open(s[i].err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0)
                _exit(127);
            execv(kvrelay, args);
            _exit(127);
        }
        s[i].pid = pid;
    }
    int running = n_streams, ready = ready_file == NULL;
    while (running > 0) {
        for (int i = 0; i < n_streams; i++) {
            if (s[i].pid && waitpid(s[i].pid, &s[i].status, WNOHANG) == s[i].pid) {
                s[i].pid = 0;
                running--;
            }
        }
        if (!ready) {
            int all = 1;
            for (int i = 0; i < n_streams && all; i++)
                all = s[i].pid == 0 ||
                      file_size(s[i].out) >= (off_t)(strlen(golden[s[i].g].prompt) + READY_BYTES);
            if (all) {
                FILE *f = fopen(ready_file, "w");
                if (f)
                    fclose(f);
                ready = 1;
                fprintf(stderr, "golden_submit: every stream is streaming (%.2f s)\n", now_s() - t0);
            }
        }
        if (now_s() - t0 > timeout_s + 30) {
            fprintf(stderr, "golden_submit: streams still running after %.0f s: killing them\n", timeout_s + 30);
            for (int i = 0; i < n_streams; i++)
                if (s[i].pid)
                    kill(s[i].pid, SIGKILL);
        }
        if (running > 0)
            sleep_ms(5);
    }
    int ok = 0;
    FILE *ranks = NULL;
    if (ranks_file && !(ranks = fopen(ranks_file, "w"))) {
        fprintf(stderr, "golden_submit: %s: %s\n", ranks_file, strerror(errno));
        return 1;
    }
    for (int i = 0; i < n_streams; i++) {
        size_t n_out = 0, n_err = 0;
        char *out = read_file(s[i].out, &n_out);
        char *err = read_file(s[i].err, &n_err);
        const struct golden_run *g = &golden[s[i].g];
        size_t want = strlen(g->text);
        int exit_ok = WIFEXITED(s[i].status) && WEXITSTATUS(s[i].status) == 0;
        int text_ok = out && n_out == want + 1 && memcmp(out, g->text, want) == 0 && out[want] == '\n';
        const char *dr = err ? strstr(err, "decode_rank=") : NULL;
        if (ranks)
            fprintf(ranks, "%d\n", dr ? atoi(dr + strlen("decode_rank=")) : -1);
        if (exit_ok && text_ok) {
            ok++;
        } else {
            size_t d = 0;
            while (out && d < n_out && d < want && out[d] == g->text[d])
                d++;
            fprintf(stderr,
                    "golden_submit: stream %d (golden %d, \"%s\"): %s %d, %s (got %zu bytes, want %zu; first "
                    "difference at byte %zu)\n  stderr: %.300s\n",
                    i, s[i].g + 1, g->prompt, WIFEXITED(s[i].status) ? "exit" : "signal",
                    WIFEXITED(s[i].status) ? WEXITSTATUS(s[i].status) : WTERMSIG(s[i].status),
                    text_ok ? "text matches" : "TEXT DIFFERS", n_out, want + 1, d, err ? err : "");
        }
        free(out);
        free(err);
        unlink(s[i].out);
        unlink(s[i].err);
    }
    rmdir(dir);
    if (ranks)
        fclose(ranks);
    for (int g = 0; g < n_golden; g++)
        golden_run_free(&golden[g]);
    fprintf(stderr, "golden_submit: %d/%d streams returned the golden text (%.2f s)\n", ok, n_streams,
            now_s() - t0);
    return ok == n_streams ? 0 : 1;
}
