/* The test node's sandbox process: holds the pod's namespaces, reaps the zombies it inherits as
 * PID 1 and exits on SIGTERM or SIGINT. Built static (`cc -static`) into a FROM scratch image by
 * `tests/control-plane up --node`, because no registry is reachable for the usual pause image. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop_action = {.sa_handler = stop};
    struct sigaction reap_action = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigaction(SIGTERM, &stop_action, NULL);
    sigaction(SIGINT, &stop_action, NULL);
    sigaction(SIGCHLD, &reap_action, NULL);
    for (;;) pause();
}
