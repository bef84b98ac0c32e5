/* test_cli_kvtype.c - `--kv-type` end to end (issue 13): `kvrelay ppl --kv-type f16/bf16`
 * on the first 512 tokens of TinyStories within a stated bound of the f32 cache's
 * perplexity, the JSON naming the type, `kvrelay generate --kv-type f16` printing the
 * f32 cache's text on a golden prompt, and bad values refused with a usage error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "run_cmd.h"

static char kvrelay[1024], model[512], tokp[512], text[512];

static double ppl_of(const char *kv_type) {
    char kt[8];
    snprintf(kt, sizeof kt, "%s", kv_type);
    char *argv[] = {kvrelay, "ppl", "--model", model, "--tokenizer", tokp, "--text", text, "--tokens", "512",
                    "--json", "--threads", "1", "--kv-type", kt, NULL};
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 120, &r) == 0);
    CHECK_EQ(r.exit_code, 0);
    char want[64];
    snprintf(want, sizeof want, "\"kv_type\": \"%s\"", kv_type);
    CHECK(strstr(r.out, want) != NULL);
    const char *p = strstr(r.out, "\"ppl\": ");
    double v = p ? atof(p + 7) : -1;
    if (!p)
        fprintf(stderr, "  ppl: no value in '%s' (stderr: %s)\n", r.out, r.err);
    cmd_result_free(&r);
    return v;
}

static void test_ppl(void) {
    double f32 = ppl_of("f32"), f16 = ppl_of("f16"), bf16 = ppl_of("bf16");
    /* Measured on this model: f32 9.76087, f16 9.76116 (+0.003%), bf16 9.77996 (+0.20%).
     * Bounds: f16 within 0.05%, bf16 within 1% (bf16 keeps 8 bits of mantissa, f16 11). */
    fprintf(stderr, "ppl, 512 tokens: f32 %.6f, f16 %.6f (%+.4f%%), bf16 %.6f (%+.4f%%)\n", f32, f16,
            100 * (f16 / f32 - 1), bf16, 100 * (bf16 / f32 - 1));
    CHECK(f32 > 1 && f16 > 1 && bf16 > 1);
    CHECK(f16 / f32 - 1 < 5e-4 && f32 / f16 - 1 < 5e-4);
    CHECK(bf16 / f32 - 1 < 1e-2 && f32 / bf16 - 1 < 1e-2);
    CHECK(f16 != f32); /* the cache really is rounded */
}

static char *generate(const char *kv_type) {
    char kt[8];
    snprintf(kt, sizeof kt, "%s", kv_type);
    char *argv[] = {kvrelay, "generate", "--model", model, "--tokenizer", tokp, "--prompt", "Once upon a time",
                    "--steps", "200", "--temperature", "0", "--kv-type", kt, NULL};
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 120, &r) == 0);
    CHECK_EQ(r.exit_code, 0);
    char *out = r.out;
    r.out = NULL;
    cmd_result_free(&r);
    return out;
}

static void expect_usage(char *const argv[], const char *want) {
    struct cmd_result r;
    REQUIRE(run_cmd(argv, 60, &r) == 0);
    CHECK_EQ(r.exit_code, 2);
    CHECK(strstr(r.err, want) != NULL);
    if (!strstr(r.err, want))
        fprintf(stderr, "  %s %s: stderr '%s' lacks '%s'\n", argv[1], argv[2], r.err, want);
    cmd_result_free(&r);
}

int main(void) {
    snprintf(kvrelay, sizeof kvrelay, "%s", bin_path("kvrelay"));
    snprintf(model, sizeof model, "%s", shared_path("models/stories260K.bin"));
    snprintf(tokp, sizeof tokp, "%s", shared_path("models/tok512.bin"));
    snprintf(text, sizeof text, "%s", shared_path("data/tinystories_valid_100.txt"));
    test_ppl();
    char *a = generate("f32"), *b = generate("f16");
    CHECK(strlen(a) > 100);
    CHECK_STREQ(a, b); /* measured: f16 keeps all 5 golden runs (test_kv_type) */
    free(a);
    free(b);
    expect_usage((char *[]){kvrelay, "generate", "--model", model, "--kv-type", "f8", NULL}, "kv-type");
    expect_usage((char *[]){kvrelay, "ppl", "--model", model, "--text", text, "--kv-type", "q8_0", NULL}, "kv-type");
    expect_usage((char *[]){kvrelay, "up", "--model", model, "--kv-type", "f64", NULL}, "--kv-type must be");
    expect_usage((char *[]){kvrelay, "up", "--model", model, "--kv-type", "f16", "--kv-dtype", "bf16", NULL},
                 "conflicts with --kv-type");
    CHECK_DONE();
}
