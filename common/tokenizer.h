/* tokenizer.h - llama2.c tokenizer.bin: SentencePiece-style BPE with scores, byte
 * fallback (<0xXX> at ids 3..258), BOS=1, EOS=2, and llama2.c's leading-space rules.
 * Immutable after load: safe to share across threads. */
#ifndef KVR_TOKENIZER_H
#define KVR_TOKENIZER_H

#include <stddef.h>

#define KVR_TOKEN_BOS 1
#define KVR_TOKEN_EOS 2

struct kvr_tokenizer;

/* Loads path for a model with vocab_size tokens. Errors (logged): KVR_ENOENT missing,
 * KVR_ETRUNC fewer entries than vocab_size, KVR_EFORMAT negative/oversize lengths or
 * more bytes than vocab_size entries (a tokenizer of another model). Returns owned
 * *out, free with kvr_tokenizer_free. */
int kvr_tokenizer_load(const char *path, int vocab_size, struct kvr_tokenizer **out);

/* Accepts NULL. */
void kvr_tokenizer_free(struct kvr_tokenizer *t);

int kvr_tokenizer_vocab_size(const struct kvr_tokenizer *t);

/* Encodes text as llama2.c's encode(): optional BOS, a dummy-prefix " " when text is
 * not empty, UTF-8 code points looked up whole or byte-fallback, then greedy BPE merges
 * by score (leftmost among equal scores), optional EOS. At most strlen(text)+3 tokens.
 * Writes up to max_tokens ids into tokens and the count into *n_tokens.
 * KVR_ERANGE when max_tokens is too small (nothing useful written), KVR_ENOMEM. */
int kvr_tokenizer_encode(const struct kvr_tokenizer *t, const char *text, int bos, int eos,
                         int *tokens, int max_tokens, int *n_tokens);

/* The text of token after prev, as llama2.c's decode(): the leading space is dropped
 * after BOS, <0xXX> pieces become the raw byte. Borrowed from t; "" for an id out of range. */
const char *kvr_tokenizer_piece(const struct kvr_tokenizer *t, int prev, int token);

/* Like kvr_tokenizer_piece but filtered as llama2.c's safe_printf: a single byte that is
 * neither printable nor whitespace becomes "". This is what generate prints. */
const char *kvr_tokenizer_piece_safe(const struct kvr_tokenizer *t, int prev, int token);

/* The raw vocabulary string of a token (no decoding rules); NULL when out of range. */
const char *kvr_tokenizer_vocab(const struct kvr_tokenizer *t, int token);

#endif /* KVR_TOKENIZER_H */
