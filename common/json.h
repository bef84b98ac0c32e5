/* json.h - JSON string literals for the --json outputs. */
#ifndef KVR_JSON_H
#define KVR_JSON_H

#include <stdio.h>

/* Writes s to f as a JSON string literal (quotes included): quotes, backslashes and
 * control characters escaped, valid UTF-8 kept, invalid bytes as U+FFFD. s may be NULL
 * (written as ""). */
void kvr_json_write_string(FILE *f, const char *s);

#endif /* KVR_JSON_H */
