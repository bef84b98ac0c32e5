/* test_cli_ppl.c - `kvrelay ppl` end to end: the JSON object has the keys and the
 * same perplexity kvr_ppl_eval computes in this process for the same file, the text line
 * has its fields, and usage errors exit 2 with a reason (dense past the trained context,
 * more tokens than the text has, a sink count not below the window), a missing model 1. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model.h"
#include "ppl.h"
#include "run_cmd.h"
#include "status.h"
#include "tokenizer.h"

#define MODEL shared_path("models/stories260K.bin")
#define TOK shared_path("models/tok512.bin")
#define TEXT shared_path("data/tinystories_valid_100.txt")

/* The number after "key": in a one-line JSON object, or NAN. */
static double json_num(const char *json, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(json, pat);
    return p ? strtod(p + strlen(pat), NULL) : (double)NAN;
}

/* ppl of the first n tokens of the file under window L, computed here. */
static double ppl_here(int n, int L) {
    struct kvr_model *m = NULL;
    struct kvr_tokenizer *tok = NULL;
    REQUIRE(kvr_model_load(MODEL, &m) == KVR_OK);
    REQUIRE(kvr_tokenizer_load(TOK, 512, &tok) == KVR_OK);
    FILE *f = fopen(TEXT, "rb");
    REQUIRE(f);
    static char text[1 << 17];
    size_t len = fread(text, 1, sizeof text - 1, f);
    REQUIRE(feof(f));
    fclose(f);
    text[len] = '\0';
    int *ids = malloc((len + 3) * sizeof *ids), n_ids = 0;
    REQUIRE(ids && kvr_tokenizer_encode(tok, text, 1, 0, ids, (int)len + 3, &n_ids) == KVR_OK);
    struct kvr_ppl_params p = {.model = m, .tokens = ids, .n_tokens = n,
                               .policy = {.policy = KVR_KV_WINDOW, .window = L}, .n_threads = 1};
    struct kvr_ppl_result r;
    REQUIRE(kvr_ppl_eval(&p, NULL, &r) == KVR_OK);
    free(ids);
    kvr_tokenizer_free(tok);
    kvr_model_free(m);
    return r.ppl;
}

static void expect_usage_error(const char *what, char *const argv[], int code, const char *needle) {
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 60, &r) == 0);
    CHECK_EQ(r.exit_code, code);
    CHECK_EQ(r.out_len, 0);
    int found = strstr(r.err, needle) != NULL;
    if (!found)
        fprintf(stderr, "  %s: stderr lacks '%s':\n%s\n", what, needle, r.err);
    CHECK(found);
    cmd_result_free(&r);
}

int main(void) {
    char bin[1024], model[1024], tok[1024], text[1024];
    snprintf(bin, sizeof bin, "%s", bin_path("kvrelay"));
    snprintf(model, sizeof model, "%s", MODEL);
    snprintf(tok, sizeof tok, "%s", TOK);
    snprintf(text, sizeof text, "%s", TEXT);

    /* JSON: keys and values. */
    char *json_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text", text,
                         "--tokens", "700", "--kv-policy", "window", "--kv-window", "64", "--json",
                         "--threads", "1", NULL};
    struct cmd_result r;
    REQUIRE(run_cmd(json_argv, 120, &r) == 0);
    CHECK_EQ(r.exit_code, 0);
    CHECK_EQ(count_lines(r.out), 1);
    fprintf(stderr, "json: %s", r.out);
    const char *keys[] = {"ppl", "nll", "tokens", "kv_window", "kv_sinks", "seconds"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK(!isnan(json_num(r.out, keys[i])));
    CHECK(strstr(r.out, "\"policy\": \"window\"") != NULL);
    CHECK(r.out[0] == '{' && strstr(r.out, "}\n") != NULL);
    double ppl = json_num(r.out, "ppl");
    CHECK_NEAR(ppl, exp(json_num(r.out, "nll")), 1e-5 * ppl);
    CHECK_EQ((int)json_num(r.out, "tokens"), 700);
    CHECK_EQ((int)json_num(r.out, "kv_window"), 64);
    CHECK_EQ((int)json_num(r.out, "kv_sinks"), 0);
    double here = ppl_here(700, 64);
    CHECK_NEAR(ppl, here, 2e-6 * here); /* printed with 6 decimals */
    cmd_result_free(&r);

    /* Text: one line with the fields. */
    char *text_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text", text,
                         "--tokens", "300", "--kv-policy", "sink", "--kv-window", "32", "--kv-sinks", "4", NULL};
    REQUIRE(run_cmd(text_argv, 120, &r) == 0);
    CHECK_EQ(r.exit_code, 0);
    CHECK_EQ(count_lines(r.out), 1);
    fprintf(stderr, "text: %s", r.out);
    CHECK(strncmp(r.out, "ppl=", 4) == 0);
    CHECK(strstr(r.out, " tokens=300 policy=sink kv_window=32 kv_sinks=4 seconds=") != NULL);
    cmd_result_free(&r);

    /* Errors. */
    char *dense_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text", text,
                          "--tokens", "1000", NULL};
    expect_usage_error("dense past the context", dense_argv, 2, "--allow-extrapolation");
    char *many_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text", text,
                         "--tokens", "10000000", "--kv-policy", "window", NULL};
    expect_usage_error("too many tokens", many_argv, 2, "encodes to");
    char *sink_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text", text,
                         "--kv-policy", "sink", "--kv-window", "8", "--kv-sinks", "8", NULL};
    expect_usage_error("sinks >= window", sink_argv, 2, "sinks");
    char *nomodel_argv[] = {bin, "ppl", "--model", "/nonexistent/model.bin", "--tokenizer", tok,
                            "--text", text, NULL};
    expect_usage_error("missing model", nomodel_argv, 1, "cannot load model");
    char *notext_argv[] = {bin, "ppl", "--model", model, "--tokenizer", tok, "--text",
                           "/nonexistent/text.txt", NULL};
    expect_usage_error("missing text", notext_argv, 1, "cannot read");
    CHECK_DONE();
}
