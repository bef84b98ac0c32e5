/* test_bench_kvwire.c - `kvrelay bench kvwire --json` on the bundled model: it runs, prints
 * one row per value type x transform x level with the keys the issue names, and the
 * rows carry the format's claims on a real (trained) cache: the f32 shuffle beats plain
 * zstd at the same level by >= 8%, f32 is bit-exact, bf16 + shuffle moves <= 40% of the
 * raw f32 bytes. Ratios are deterministic; no speed is asserted. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

struct row {
    char value_type[8], transform[40];
    int level;
    double ratio, compress_mbs, decompress_mbs, max_abs_err;
    unsigned long long bit_mismatches;
};

int main(void) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "'%s/kvrelay' bench kvwire --model '%s' --tokenizer '%s' --levels 1,3 --threads 1 "
             "--min-time 0 --json",
             KVR_BIN_DIR, shared_path("models/stories260K.bin"), shared_path("models/tok512.bin"));
    FILE *p = popen(cmd, "r");
    REQUIRE(p);
    struct row rows[16];
    int n = 0, open_bracket = 0, close_bracket = 0;
    char line[4096];
    while (fgets(line, sizeof line, p)) {
        open_bracket += line[0] == '[';
        close_bracket += line[0] == ']';
        struct row r;
        if (sscanf(line,
                   " {\"value_type\": \"%7[^\"]\", \"transform\": \"%39[^\"]\", \"level\": %d, "
                   "\"ratio\": "
                   "%lf, \"compress_mbs\": %lf, \"decompress_mbs\": %lf, \"bit_mismatches\": "
                   "%llu, \"max_abs_err\": %lf",
                   r.value_type, r.transform, &r.level, &r.ratio, &r.compress_mbs,
                   &r.decompress_mbs, &r.bit_mismatches, &r.max_abs_err) == 8 &&
            n < 16)
            rows[n++] = r;
    }
    CHECK_EQ(pclose(p), 0);
    CHECK_EQ(open_bracket, 1);
    CHECK_EQ(close_bracket, 1);
    CHECK_EQ(n, 12); /* f32, f16, bf16 x none, shuffle x levels 1, 3 */
    for (int lv = 1; lv <= 3; lv += 2) {
        const struct row *f32none = NULL, *f32shuf = NULL, *bf16shuf = NULL;
        for (int i = 0; i < n; i++) {
            CHECK(rows[i].ratio > 1.0 && rows[i].compress_mbs > 0 && rows[i].decompress_mbs > 0);
            if (rows[i].level != lv)
                continue;
            if (!strcmp(rows[i].value_type, "f32") && !strcmp(rows[i].transform, "none"))
                f32none = &rows[i];
            if (!strcmp(rows[i].value_type, "f32") && !strcmp(rows[i].transform, "shuffle"))
                f32shuf = &rows[i];
            if (!strcmp(rows[i].value_type, "bf16") && !strcmp(rows[i].transform, "shuffle"))
                bf16shuf = &rows[i];
        }
        REQUIRE(f32none && f32shuf && bf16shuf);
        fprintf(stderr,
                "level %d: f32 none %.4f, f32 shuffle %.4f (+%.1f%%), bf16 shuffle %.4f (%.1f%% of "
                "raw)\n",
                lv, f32none->ratio, f32shuf->ratio, 100.0 * (f32shuf->ratio / f32none->ratio - 1),
                bf16shuf->ratio, 100.0 / bf16shuf->ratio);
        CHECK(f32shuf->ratio >= 1.08 * f32none->ratio);
        CHECK(100.0 / bf16shuf->ratio <= 40.0);
        /* f32 is lossless: every decoded value has the original's bits. */
        CHECK_EQ(f32none->bit_mismatches, 0);
        CHECK_EQ(f32shuf->bit_mismatches, 0);
        CHECK(bf16shuf->bit_mismatches > 0 && bf16shuf->max_abs_err > 0.0);
    }
    CHECK_DONE();
}
