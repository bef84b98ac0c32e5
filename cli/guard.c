/* guard.c - kvrelay-guard: the parent of one cluster rank under `kvrelay up`.
 *   kvrelay-guard STATUS_DIR PROGRAM [ARGS...]
 * mpirun starts one guard per rank; the guard runs PROGRAM as its child and writes how it
 * ended (exit code or signal) to STATUS_DIR/rank-<R> before exiting with the same code.
 * `kvrelay up` reads those files: under --enable-recovery mpirun exits 0 whatever its ranks
 * did, so this is the only honest record of a rank that crashed, aborted or leaked.
 * It also ties the rank's life to the launcher's: the guard and the rank both ask the
 * kernel for SIGKILL when their parent dies (PR_SET_PDEATHSIG), so killing mpirun (or
 * `kvrelay up`, whose mpirun has the same setting) takes every rank down. And it turns
 * SIGUSR1, which mpirun forwards without killing anything after a timeout, into the
 * SIGTERM the ranks stop on. See docs/ARCHITECTURE.md ("Shutdown"). */
#define _GNU_SOURCE /* signalfd, prctl */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* Writes "<rank> <prog> exit <n>" or "<rank> <prog> signal <n>" atomically (temp file +
 * rename), so a reader never sees half a line. */
static void write_status(const char *dir, const char *rank, const char *prog, int st) {
    char path[4096], tmp[4200], line[512];
    const char *base = strrchr(prog, '/');
    base = base ? base + 1 : prog;
    snprintf(path, sizeof path, "%s/rank-%s", dir, rank);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    int n = WIFSIGNALED(st)
                ? snprintf(line, sizeof line, "%s %s signal %d\n", rank, base, WTERMSIG(st))
                : snprintf(line, sizeof line, "%s %s exit %d\n", rank, base, WEXITSTATUS(st));
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, line, (size_t)n) != n || close(fd) != 0 || rename(tmp, path) != 0)
        fprintf(stderr, "kvrelay-guard: cannot record rank %s's status in %s: %s\n", rank, dir,
                strerror(errno));
}

int main(int argc, char **argv) {
    /* Signals arrive on a descriptor: none is lost between checking and waiting. Blocked
     * first of all, so that a SIGUSR1 forwarded while we start is held, not fatal. */
    sigset_t set, old;
    sigemptyset(&set);
    int sigs[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaddset(&set, sigs[i]);
    if (sigprocmask(SIG_BLOCK, &set, &old) != 0)
        return 1;
    if (argc < 3) {
        fprintf(stderr, "usage: kvrelay-guard STATUS_DIR PROGRAM [ARGS...]\n"
                        "(started by `kvrelay up` through mpirun; not meant to be run by hand)\n");
        return 2;
    }
    /* Die with mpirun. If it is already gone (re-parented before prctl), leave now. */
    pid_t parent = getppid();
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || parent == 1 || getppid() != parent)
        return 1;
    const char *rank = getenv("OMPI_COMM_WORLD_RANK");
    char rank_buf[32];
    if (!rank || !*rank || strlen(rank) > 16 || strchr(rank, '/')) {
        snprintf(rank_buf, sizeof rank_buf, "pid%d", (int)getpid());
        rank = rank_buf;
    }
    int sfd = signalfd(-1, &set, SFD_CLOEXEC);
    if (sfd < 0) {
        fprintf(stderr, "kvrelay-guard: signalfd: %s\n", strerror(errno));
        return 1;
    }
    pid_t me = getpid();
    pid_t child = fork();
    if (child < 0) {
        fprintf(stderr, "kvrelay-guard: fork: %s\n", strerror(errno));
        return 1;
    }
    if (child == 0) {
        /* Its own process group: mpirun signals its children's groups (SIGUSR1 would kill
         * a rank outright); this way the rank hears only from us. */
        setpgid(0, 0);
        sigprocmask(SIG_SETMASK, &old, NULL);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != me)
            _exit(1);
        execv(argv[2], argv + 2);
        fprintf(stderr, "kvrelay-guard: cannot run %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    int st = 0;
    for (;;) {
        struct signalfd_siginfo si;
        ssize_t k = read(sfd, &si, sizeof si);
        if (k < 0 && errno == EINTR)
            continue;
        if (k != (ssize_t)sizeof si) {
            fprintf(stderr, "kvrelay-guard: reading signals: %s\n", strerror(errno));
            kill(child, SIGKILL);
            waitpid(child, &st, 0);
            break;
        }
        if (si.ssi_signo == SIGCHLD) {
            if (waitpid(child, &st, WNOHANG) == child)
                break;
        } else if (si.ssi_signo != SIGUSR2) {
            /* SIGUSR1 is how `kvrelay up` stops the job (mpirun forwards it and waits);
             * anything else that means "stop" is passed on the same way. */
            kill(child, SIGTERM);
        }
    }
    write_status(argv[1], rank, argv[2], st);
    close(sfd);
    return WIFSIGNALED(st) ? 128 + WTERMSIG(st) : WEXITSTATUS(st);
}
