/* A shared library that takes a lock: its calls come from outside the executable, so a lock fault
 * with the default caller filter ("exe") must never fail them. */
#include <pthread.h>

int shimlib_lock(pthread_mutex_t *m)
{
    int rc = pthread_mutex_lock(m);
    if (rc == 0) pthread_mutex_unlock(m);
    return rc;
}
