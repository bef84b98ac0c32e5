/* test_cli_errors.c - `kvrelay generate` (and `kvrelay up`) on bad input: every case must
 * end with the exit code cli.h documents (1: unreadable or invalid model/tokenizer; 2: bad
 * usage or rejected input), print nothing on stdout, never crash, and explain itself on
 * stderr in one line: the last stderr line is "kvrelay <command>: <what failed>",
 * optionally after one line of the library's log giving the precise reason; the reason
 * (wording of the case) must appear in one of them. Broken files are written into a temp
 * dir here. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "run_cmd.h"

static char dir[64];
static char model[1024], tokp[1024], kvrelay[1024];
static const char *subcmd = "generate"; /* the kvrelay command under test */

static char *slurp_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    REQUIRE(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    REQUIRE(buf && fread(buf, 1, (size_t)n, f) == (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Writes bytes to dir/name; returns the path (static rotation of 4). */
static const char *write_file(const char *name, const void *a, size_t na, const void *b,
                              size_t nb) {
    static char paths[4][128];
    static int k;
    k = (k + 1) % 4;
    snprintf(paths[k], sizeof paths[k], "%s/%s", dir, name);
    FILE *f = fopen(paths[k], "wb");
    REQUIRE(f);
    REQUIRE(fwrite(a, 1, na, f) == na);
    if (nb)
        REQUIRE(fwrite(b, 1, nb, f) == nb);
    REQUIRE(fclose(f) == 0);
    return paths[k];
}

/* The real model with header field `field` (0..6) replaced by value. */
static const char *patched_model(const char *name, const char *orig, size_t len, int field,
                                 int32_t value) {
    char *copy = malloc(len);
    REQUIRE(copy);
    memcpy(copy, orig, len);
    memcpy(copy + 4 * field, &value, 4);
    const char *p = write_file(name, copy, len, NULL, 0);
    free(copy);
    return p;
}

/* Runs kvrelay generate with the given options (NULL-terminated) and checks the
 * outcome. reason must appear on stderr; the last line must start with the CLI's prefix. */
static void expect(const char *name, int want_exit, const char *reason, const char *const *opts) {
    char *argv[40];
    int n = 0;
    argv[n++] = kvrelay;
    char sub[32];
    snprintf(sub, sizeof sub, "%s", subcmd);
    argv[n++] = sub;
    for (int i = 0; opts[i] && n < 39; i++)
        REQUIRE((argv[n++] = strdup(opts[i])) != NULL);
    argv[n] = NULL;
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 60, &r) == 0);
    char last[1024];
    last_line(r.err, last, sizeof last);
    int lines = count_lines(r.err);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "kvrelay %s: ", subcmd);
    int prefix_ok = strncmp(last, prefix, strlen(prefix)) == 0;
    int has_reason = strstr(r.err, reason) != NULL;
    int sanitizer = strstr(r.err, "Sanitizer") || strstr(r.err, "runtime error");
    int ok = r.exit_code == want_exit && !r.signaled && !r.timed_out && r.out_len == 0 &&
             prefix_ok && has_reason && lines >= 1 && lines <= 2 && !sanitizer;
    fprintf(stderr, "%-38s exit %d (want %d), %d stderr line(s): %s\n", name, r.exit_code,
            want_exit, lines, last);
    if (!ok) {
        fprintf(stderr,
                "  FAILED %s: want exit %d, a '%s' last line, at most 2 lines, "
                "no stdout, stderr naming '%s'. stdout %zu bytes; stderr was:\n%s\n",
                name, want_exit, prefix, reason, r.out_len, r.err);
    }
    CHECK_EQ(r.exit_code, want_exit);
    CHECK_EQ(r.signaled, 0);
    CHECK_EQ(r.timed_out, 0);
    CHECK_EQ(r.out_len, 0);
    CHECK(prefix_ok);
    CHECK(has_reason);
    CHECK(lines >= 1 && lines <= 2);
    CHECK(!sanitizer);
    cmd_result_free(&r);
    for (int i = 2; i < n; i++)
        free(argv[i]);
}

#define OPTS(...) ((const char *const[]){__VA_ARGS__, NULL})

int main(void) {
    snprintf(dir, sizeof dir, "/tmp/kvr_test_cli_errors_XXXXXX");
    REQUIRE(mkdtemp(dir));
    snprintf(model, sizeof model, "%s", shared_path("models/stories260K.bin"));
    snprintf(tokp, sizeof tokp, "%s", shared_path("models/tok512.bin"));
    snprintf(kvrelay, sizeof kvrelay, "%s", bin_path("kvrelay"));
    char big_tok[1024];
    snprintf(big_tok, sizeof big_tok, "%s", shared_path("models/llama2_tokenizer.bin"));
    size_t mlen;
    char *m = slurp_file(model, &mlen);
    REQUIRE(mlen > 1000);

    /* Model files: exit 1. */
    char missing[160];
    snprintf(missing, sizeof missing, "%s/no_such_model.bin", dir);
    expect("missing model file", 1, "no_such_model.bin",
           OPTS("--model", missing, "--tokenizer", tokp));
    expect("missing model file (reason)", 1, "No such file",
           OPTS("--model", missing, "--tokenizer", tokp));
    const char *p = write_file("truncated.bin", m, mlen - 1000, NULL, 0);
    expect("truncated model", 1, "truncated", OPTS("--model", p, "--tokenizer", tokp));
    p = write_file("trailing.bin", m, mlen, "junk", 4);
    expect("trailing bytes", 1, "trailing bytes", OPTS("--model", p, "--tokenizer", tokp));
    p = write_file("header_only_part.bin", m, 10, NULL, 0);
    expect("shorter than the header", 1, "shorter than the 28-byte header",
           OPTS("--model", p, "--tokenizer", tokp));
    p = write_file("empty.bin", "", 0, NULL, 0);
    expect("empty model file", 1, "shorter than the 28-byte header",
           OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("zero_dim.bin", m, mlen, 0, 0);
    expect("zero dim", 1, "zero or negative", OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("neg_layers.bin", m, mlen, 2, -5);
    expect("negative n_layers", 1, "zero or negative", OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("zero_kv_heads.bin", m, mlen, 4, 0);
    expect("zero n_kv_heads", 1, "zero or negative", OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("heads_3.bin", m, mlen, 4, 3);
    expect("n_heads % n_kv_heads != 0", 1, "n_heads is not divisible by n_kv_heads",
           OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("huge_vocab.bin", m, mlen, 5, INT32_MIN);
    expect("vocab INT32_MIN", 1, "zero or negative", OPTS("--model", p, "--tokenizer", tokp));
    p = patched_model("huge_dim.bin", m, mlen, 0, 0x7fffffff);
    expect("implausible dim", 1, "bad header", OPTS("--model", p, "--tokenizer", tokp));
    expect("model is a directory", 1, "not a regular file",
           OPTS("--model", dir, "--tokenizer", tokp));

    /* Tokenizer files: exit 1. */
    expect("tokenizer of another vocabulary", 1, "another model",
           OPTS("--model", model, "--tokenizer", big_tok));
    snprintf(missing, sizeof missing, "%s/no_such_tok.bin", dir);
    expect("missing tokenizer", 1, "no_such_tok.bin",
           OPTS("--model", model, "--tokenizer", missing));
    size_t tlen;
    char *t = slurp_file(tokp, &tlen);
    p = write_file("tok_truncated.bin", t, tlen / 2, NULL, 0);
    expect("truncated tokenizer", 1, "truncated", OPTS("--model", model, "--tokenizer", p));
    free(t);

    /* Usage: exit 2. */
    expect("unknown flag", 2, "unknown option '--frobnicate'",
           OPTS("--model", model, "--tokenizer", tokp, "--frobnicate", "1"));
    expect("missing --model", 2, "'--model' is required",
           OPTS("--tokenizer", tokp, "--prompt", "hi"));
    expect("missing --tokenizer (llama2.c model)", 2, "pass --tokenizer", OPTS("--model", model));
    expect("--steps not a number", 2, "--steps: 'abc' is not an integer",
           OPTS("--model", model, "--tokenizer", tokp, "--steps", "abc"));
    expect("--steps 0", 2, "--steps", OPTS("--model", model, "--tokenizer", tokp, "--steps", "0"));
    expect("--steps 12x", 2, "--steps: '12x'",
           OPTS("--model", model, "--tokenizer", tokp, "--steps", "12x"));
    expect("--temperature -1", 2, "--temperature",
           OPTS("--model", model, "--tokenizer", tokp, "--temperature", "-1"));
    expect("--top-p 1.5", 2, "--top-p",
           OPTS("--model", model, "--tokenizer", tokp, "--top-p", "1.5"));
    expect("--seed -5", 2, "--seed", OPTS("--model", model, "--tokenizer", tokp, "--seed", "-5"));
    expect("--kv-policy bogus", 2, "--kv-policy",
           OPTS("--model", model, "--tokenizer", tokp, "--kv-policy", "bogus"));
    expect("sinks >= window", 2, "sinks",
           OPTS("--model", model, "--tokenizer", tokp, "--kv-policy", "sink", "--kv-window", "4",
                "--kv-sinks", "4"));
    expect("option without its value", 2, "--steps",
           OPTS("--model", model, "--tokenizer", tokp, "--steps"));
    expect("stray argument", 2, "unexpected argument 'story'",
           OPTS("--model", model, "--tokenizer", tokp, "story"));

    /* Rejected input: exit 2. */
    expect("--steps shorter than the prompt", 2, "the prompt is 5 tokens but --steps is 3",
           OPTS("--model", model, "--tokenizer", tokp, "--prompt", "Once upon a time", "--steps",
                "3"));
    /* A prompt of more than 512 tokens (real text) under dense. */
    size_t dlen;
    char *text = slurp_file(shared_path("data/tinystories_valid_100.txt"), &dlen);
    REQUIRE(dlen > 4000);
    text[4000] = '\0';
    expect("prompt longer than the context", 2, "exceed the model's context of 512",
           OPTS("--model", model, "--tokenizer", tokp, "--prompt", text, "--steps", "2000"));
    expect("prompt longer than --steps", 2, "but --steps is 256",
           OPTS("--model", model, "--tokenizer", tokp, "--prompt", text));
    free(text);
    expect("--steps past the context", 2, "exceed the model's context of 512",
           OPTS("--model", model, "--tokenizer", tokp, "--steps", "513"));

    /* kvrelay up checks the files itself before it starts mpirun: one clear line, no
     * cluster started (the test's 60 s bound would catch a launch that hangs). */
    subcmd = "up";
    p = write_file("truncated.bin", m, mlen - 1000, NULL, 0);
    expect("up: truncated model", 1, "truncated", OPTS("--model", p, "--tokenizer", tokp));
    expect("up: tokenizer of another vocabulary", 1, "another model",
           OPTS("--model", model, "--tokenizer", big_tok));
    expect("up: unknown flag", 2, "unknown option '--frobnicate'",
           OPTS("--model", model, "--tokenizer", tokp, "--frobnicate"));
    subcmd = "generate";

    free(m);
    /* Clean the temp dir (only files this test wrote). */
    static const char *const names[] = {
        "truncated.bin",  "trailing.bin",   "header_only_part.bin", "empty.bin",
        "zero_dim.bin",   "neg_layers.bin", "zero_kv_heads.bin",    "heads_3.bin",
        "huge_vocab.bin", "huge_dim.bin",   "tok_truncated.bin"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[160];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        unlink(path);
    }
    rmdir(dir);
    CHECK_DONE();
}
