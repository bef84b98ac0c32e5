/* test_cli_generate.c - `kvrelay generate` end to end on every golden prompt: greedy,
 * 256 steps, stdout must be llama2.c's text byte for byte plus one newline, and the last
 * stderr line must be the stats line with the token counts the golden ids imply. Also
 * once under --kv-policy sink with a window larger than the run (nothing evicted: the
 * same text). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "golden.h"
#include "run_cmd.h"
#include "status.h"
#include "tokenizer.h"

/* Prompt tokens the golden ids imply: the shortest BOS-first prefix of ids whose decoded
 * text (llama2.c's decode, leading space dropped after BOS) is exactly the prompt. */
static int implied_prompt_tokens(const struct kvr_tokenizer *tok, const struct golden_run *g) {
    char text[4096] = "";
    size_t len = 0, plen = strlen(g->prompt);
    for (int k = 1; k <= g->n_ids; k++) {
        if (len == plen && strcmp(text, g->prompt) == 0)
            return k;
        if (k == g->n_ids || len > plen)
            break;
        const char *piece = kvr_tokenizer_piece(tok, g->ids[k - 1], g->ids[k]);
        size_t pl = strlen(piece);
        if (len + pl >= sizeof text)
            break;
        memcpy(text + len, piece, pl + 1);
        len += pl;
    }
    return -1;
}

/* Reports where two texts first differ (with a little context of each). */
static void show_diff(const char *what, const char *got, const char *want) {
    size_t i = 0;
    while (got[i] && got[i] == want[i])
        i++;
    size_t from = i > 30 ? i - 30 : 0;
    fprintf(stderr,
            "  %s: stdout differs at byte %zu (got %zu bytes, want %zu):\n    got:  '%.60s'\n"
            "    want: '%.60s'\n",
            what, i, strlen(got), strlen(want), got + from, want + from);
}

static void check_run(const char *name, const struct golden_run *g, int n_prompt,
                      char *const argv[]) {
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 120, &r) == 0);
    CHECK_EQ(r.timed_out, 0);
    CHECK_EQ(r.exit_code, 0);
    CHECK_EQ(r.signaled, 0);
    size_t tlen = strlen(g->text);
    char *want = malloc(tlen + 2);
    REQUIRE(want);
    memcpy(want, g->text, tlen);
    memcpy(want + tlen, "\n", 2);
    int same = r.out_len == tlen + 1 && memcmp(r.out, want, tlen + 1) == 0;
    if (!same)
        show_diff(name, r.out, want);
    CHECK(same);

    /* Last stderr line: exactly the stats line, with the implied counts. */
    char line[512];
    last_line(r.err, line, sizeof line);
    int n = -1, gen = -1, used = 0;
    double pf = -1, dc = -1;
    int fields =
        sscanf(line, "prompt_tokens=%d generated_tokens=%d prefill_tok_s=%lf decode_tok_s=%lf%n",
               &n, &gen, &pf, &dc, &used);
    int stopped_at_bos = g->ids[g->n_ids - 1] == KVR_TOKEN_BOS;
    int want_gen = g->n_ids - n_prompt - stopped_at_bos;
    if (fields != 4 || line[used] != '\0')
        fprintf(stderr, "  %s: last stderr line is not the stats line: '%s'\n", name, line);
    CHECK_EQ(fields, 4);
    CHECK_EQ(line[used], '\0');
    CHECK_EQ(n, n_prompt);
    CHECK_EQ(gen, want_gen);
    CHECK(pf > 0);
    CHECK(dc > 0);
    fprintf(stderr,
            "  %s: exit %d, %zu stdout bytes, prompt_tokens=%d generated_tokens=%d (want %d, %d)\n",
            name, r.exit_code, r.out_len, n, gen, n_prompt, want_gen);
    free(want);
    cmd_result_free(&r);
}

int main(void) {
    char model[1024], tokp[1024];
    snprintf(model, sizeof model, "%s", shared_path("models/stories260K.bin"));
    snprintf(tokp, sizeof tokp, "%s", shared_path("models/tok512.bin"));
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_tokenizer_load(tokp, 512, &tok) == KVR_OK);
    char *paths[16];
    int n_paths = golden_run_paths(paths, 16);
    fprintf(stderr, "%d golden runs\n", n_paths);
    CHECK(n_paths >= 5);
    char kvrelay[1024];
    snprintf(kvrelay, sizeof kvrelay, "%s", bin_path("kvrelay"));
    for (int i = 0; i < n_paths; i++) {
        struct golden_run g;
        REQUIRE(golden_run_load(paths[i], &g) == 0);
        int n_prompt = implied_prompt_tokens(tok, &g);
        if (n_prompt < 1)
            fprintf(stderr, "%s: no prefix of ids decodes to the prompt '%s'\n", paths[i],
                    g.prompt);
        REQUIRE(n_prompt >= 1);
        char steps[16];
        snprintf(steps, sizeof steps, "%d", g.steps);
        const char *name = strrchr(paths[i], '/') + 1;
        char *argv[] = {kvrelay,    "generate", "--model", model, "--tokenizer",   tokp,
                        "--prompt", g.prompt,   "--steps", steps, "--temperature", "0",
                        NULL};
        check_run(name, &g, n_prompt, argv);
        if (i == 0) {
            /* Sink whose window holds the whole run evicts nothing: the same text. */
            char *argv_sink[] = {
                kvrelay,       "generate", "--model",     model, "--tokenizer",   tokp,
                "--prompt",    g.prompt,   "--steps",     steps, "--temperature", "0",
                "--kv-policy", "sink",     "--kv-window", "300", "--kv-sinks",    "4",
                "--threads",   "1",        NULL};
            check_run("sink, window 300", &g, n_prompt, argv_sink);
        }
        golden_run_free(&g);
        free(paths[i]);
    }
    kvr_tokenizer_free(tok);
    CHECK_DONE();
}
