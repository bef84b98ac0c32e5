/* fuzz_gguf_seeds.c - writes a seed corpus for fuzz_gguf: tiny llama models as GGUF files
 * (F32, F16, BF16, Q8_0 with an F16 fallback, a tied classifier, version 2 with alignment
 * 64), each with a SentencePiece vocabulary (control, byte and normal pieces, scores,
 * token types), and the metadata of a bundled file. Usage: fuzz_gguf_seeds DIR.
 * Generated at run time so no binaries live in the repo. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gguf_edit.h"
#include "half.h"
#include "quant.h"

#ifndef KVR_SHARED_DIR
#define KVR_SHARED_DIR "../shared"
#endif

enum { DIM = 32, HID = 64, LAYERS = 1, HEADS = 2, KV_HEADS = 1, VOCAB = 64 };

static uint64_t rng = 0x5eed6;

static float frand(void) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((int)(rng >> 40) % 2001 - 1000) * 1e-4f;
}

static void add_tensor(struct gg *g, const char *name, int rows, int cols, uint32_t type) {
    struct gg_tensor *t = &g->t[g->n_t++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->n_dims = rows ? 2 : 1;
    t->ne[0] = (uint64_t)cols;
    t->ne[1] = rows ? (uint64_t)rows : 1;
    t->ne[2] = t->ne[3] = 1;
    t->type = rows ? type : 0;
    int r = rows ? rows : 1;
    t->nbytes = kvr_dtype_row_nbytes((enum kvr_dtype)t->type, cols) * (size_t)r;
    t->data = malloc(t->nbytes);
    float *row = malloc((size_t)cols * sizeof *row);
    if (!t->data || !row)
        exit(1);
    for (int i = 0; i < r; i++) {
        for (int j = 0; j < cols; j++)
            row[j] = rows ? frand() : 1.0f;
        unsigned char *o = t->data + (size_t)i * kvr_dtype_row_nbytes((enum kvr_dtype)t->type, cols);
        if (t->type == KVR_DTYPE_F32) {
            memcpy(o, row, (size_t)cols * 4);
        } else if (t->type == KVR_DTYPE_Q8_0) {
            kvr_quantize_row_q8_0(row, (struct kvr_block_q8_0 *)(void *)o, cols);
        } else {
            for (int j = 0; j < cols; j++) {
                uint16_t h = t->type == KVR_DTYPE_F16 ? kvr_f32_to_f16(row[j]) : kvr_f32_to_bf16(row[j]);
                memcpy(o + 2 * j, &h, 2);
            }
        }
    }
    free(row);
}

/* An array value: element type, count, then the elements' bytes. */
static void set_array(struct gg *g, const char *key, uint32_t et, uint64_t n, const void *elems, size_t nbytes) {
    unsigned char *raw = malloc(12 + nbytes);
    if (!raw)
        exit(1);
    memcpy(raw, &et, 4);
    memcpy(raw + 4, &n, 8);
    memcpy(raw + 12, elems, nbytes);
    gg_set_raw(g, key, 9, raw, 12 + nbytes);
    free(raw);
}

static void vocab(struct gg *g) {
    unsigned char strs[VOCAB * 16];
    size_t len = 0;
    float scores[VOCAB];
    int32_t types[VOCAB];
    for (int i = 0; i < VOCAB; i++) {
        char piece[16];
        if (i == 0)
            strcpy(piece, "<unk>");
        else if (i == 1)
            strcpy(piece, "<s>");
        else if (i == 2)
            strcpy(piece, "</s>");
        else if (i < 3 + 16)
            snprintf(piece, sizeof piece, "<0x%02X>", (i - 3) * 16 + 1); /* some byte pieces */
        else if (i < 3 + 16 + 26)
            snprintf(piece, sizeof piece, "%c", 'a' + i - 19);
        else
            snprintf(piece, sizeof piece, "\xe2\x96\x81%c%c", 'a' + i % 26, 'e' + i % 5);
        types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 19 ? 6 : 1;
        scores[i] = -(float)i;
        uint64_t l = strlen(piece);
        memcpy(strs + len, &l, 8);
        memcpy(strs + len + 8, piece, l);
        len += 8 + l;
    }
    gg_set_str(g, "tokenizer.ggml.model", "llama");
    set_array(g, "tokenizer.ggml.tokens", 8, VOCAB, strs, len);
    set_array(g, "tokenizer.ggml.scores", 6, VOCAB, scores, sizeof scores);
    set_array(g, "tokenizer.ggml.token_type", 5, VOCAB, types, sizeof types);
    gg_set_u32(g, "tokenizer.ggml.bos_token_id", 1);
    gg_set_u32(g, "tokenizer.ggml.eos_token_id", 2);
    gg_set_bool(g, "tokenizer.ggml.add_bos_token", 1);
}

static void tiny(struct gg *g, uint32_t type, int tied) {
    memset(g, 0, sizeof *g);
    g->version = 3;
    g->alignment = 32;
    gg_set_str(g, "general.architecture", "llama");
    gg_set_u32(g, "llama.context_length", 64);
    gg_set_u32(g, "llama.embedding_length", DIM);
    gg_set_u32(g, "llama.block_count", LAYERS);
    gg_set_u32(g, "llama.feed_forward_length", HID);
    gg_set_u32(g, "llama.attention.head_count", HEADS);
    gg_set_u32(g, "llama.attention.head_count_kv", KV_HEADS);
    gg_set_u32(g, "llama.rope.dimension_count", DIM / HEADS);
    gg_set_f32(g, "llama.rope.freq_base", 10000.0f);
    gg_set_f32(g, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    vocab(g);
    add_tensor(g, "token_embd.weight", VOCAB, DIM, type);
    add_tensor(g, "output_norm.weight", 0, DIM, 0);
    if (!tied)
        add_tensor(g, "output.weight", VOCAB, DIM, type);
    int kv = DIM / HEADS * KV_HEADS;
    for (int l = 0; l < LAYERS; l++) {
        char n[64];
#define T(suffix, rows, cols, ty)                          \
    snprintf(n, sizeof n, "blk.%d." suffix, l);            \
    add_tensor(g, n, rows, cols, ty)
        T("attn_norm.weight", 0, DIM, 0);
        T("attn_q.weight", DIM, DIM, type);
        T("attn_k.weight", kv, DIM, type);
        T("attn_v.weight", kv, DIM, type);
        T("attn_output.weight", DIM, DIM, type);
        T("ffn_norm.weight", 0, DIM, 0);
        T("ffn_gate.weight", HID, DIM, type);
        T("ffn_down.weight", DIM, HID, type == KVR_DTYPE_Q8_0 ? KVR_DTYPE_F16 : type);
        T("ffn_up.weight", HID, DIM, type);
#undef T
    }
}

static int n_files;

static void save(const char *dir, const char *name, const struct gg *g, size_t max_len) {
    struct gg_layout lay;
    unsigned char *img = gg_write(g, 0, &lay);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    gg_save(path, img, lay.len < max_len ? lay.len : max_len);
    free(img);
    n_files++;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const char *dir = argv[1];
    static const struct {
        const char *name;
        uint32_t type;
    } types[] = {{"tiny-f32.gguf", KVR_DTYPE_F32}, {"tiny-f16.gguf", KVR_DTYPE_F16},
                 {"tiny-bf16.gguf", KVR_DTYPE_BF16}, {"tiny-q8_0.gguf", KVR_DTYPE_Q8_0}};
    struct gg g;
    for (int i = 0; i < 4; i++) {
        tiny(&g, types[i].type, 0);
        save(dir, types[i].name, &g, (size_t)-1);
        gg_free(&g);
    }
    tiny(&g, KVR_DTYPE_Q8_0, 1);
    save(dir, "tiny-tied.gguf", &g, (size_t)-1);
    gg_free(&g);
    tiny(&g, KVR_DTYPE_F16, 0);
    g.version = 2;
    g.alignment = 64;
    gg_set_u32(&g, "general.alignment", 64);
    save(dir, "tiny-v2-align64.gguf", &g, (size_t)-1);
    gg_free(&g);
    /* A real file's metadata (its 512-piece vocabulary), cut where the data begins. */
    struct gg_layout lay;
    gg_read(KVR_SHARED_DIR "/models/gguf/stories260K-q8_0.gguf", &g);
    unsigned char *img = gg_write(&g, 0, &lay);
    free(img);
    save(dir, "stories260K-q8_0-metadata.gguf", &g, lay.data_off + 64);
    gg_free(&g);
    fprintf(stderr, "fuzz_gguf_seeds: %d files in %s\n", n_files, dir);
    return 0;
}
