/* test_role.c - the rules behind a node's --weights auto and --threads 0 (common/role.c):
 * a private copy and every CPU for a node alone on its host; the shared mapping and a
 * share of the CPUs when several nodes share one. Pure functions over the job's layout;
 * no MPI needed. */
#include <stdio.h>

#include "check.h"
#include "model.h"
#include "role.h"
#include "xfer.h"

int main(void) {
    /* kvrelay up on one machine: coordinator + 1 prefill + 2 decode on host "a". */
    const int roles1[] = {KVR_ROLE_COORD, KVR_ROLE_PREFILL, KVR_ROLE_DECODE, KVR_ROLE_DECODE};
    const char *const one_host[] = {"a", "a", "a", "a"};
    for (int r = 1; r < 4; r++)
        CHECK_EQ(kvr_role_weights_auto(4, roles1, one_host, r), KVR_WEIGHTS_MMAP);

    /* One machine per rank (the Slurm script's layout): every node copies, and the
     * coordinator sharing a host with a node does not count against it. */
    const char *const own_hosts[] = {"a", "b", "c", "d"};
    for (int r = 1; r < 4; r++)
        CHECK_EQ(kvr_role_weights_auto(4, roles1, own_hosts, r), KVR_WEIGHTS_COPY);
    const char *const coord_with_prefill[] = {"a", "a", "c", "d"};
    CHECK_EQ(kvr_role_weights_auto(4, roles1, coord_with_prefill, 1), KVR_WEIGHTS_COPY);

    /* Mixed: two decode nodes share "c", the prefill node is alone on "b". */
    const char *const mixed[] = {"a", "b", "c", "c"};
    CHECK_EQ(kvr_role_weights_auto(4, roles1, mixed, 1), KVR_WEIGHTS_COPY);
    CHECK_EQ(kvr_role_weights_auto(4, roles1, mixed, 2), KVR_WEIGHTS_MMAP);
    CHECK_EQ(kvr_role_weights_auto(4, roles1, mixed, 3), KVR_WEIGHTS_MMAP);

    /* A colocated node (role decode) alone on its host copies too. */
    const int roles2[] = {KVR_ROLE_COORD, KVR_ROLE_DECODE};
    const char *const two_hosts[] = {"a", "b"};
    CHECK_EQ(kvr_role_weights_auto(2, roles2, two_hosts, 1), KVR_WEIGHTS_COPY);

    /* --threads 0: the host's CPUs among its prefill and decode nodes (the coordinator
     * does not count), at least one each. */
    for (int r = 1; r < 4; r++) {
        CHECK_EQ(kvr_role_threads_auto(4, roles1, one_host, r, 2), 1);
        CHECK_EQ(kvr_role_threads_auto(4, roles1, one_host, r, 12), 4);
        CHECK_EQ(kvr_role_threads_auto(4, roles1, own_hosts, r, 8), 8);
    }
    CHECK_EQ(kvr_role_threads_auto(4, roles1, coord_with_prefill, 1, 2), 2);
    CHECK_EQ(kvr_role_threads_auto(4, roles1, mixed, 1, 16), 16);
    CHECK_EQ(kvr_role_threads_auto(4, roles1, mixed, 2, 16), 8);
    CHECK_EQ(kvr_role_threads_auto(4, roles1, mixed, 3, 1), 1);
    CHECK(kvr_role_threads(NULL, 3) == 3);
    CHECK(kvr_role_threads(NULL, 0) >= 1);
    CHECK_DONE();
}
