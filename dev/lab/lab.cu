// lab.cu: the one definition behind lab.cuh's launch switch, linked into every ladder's library.
#include "lab.cuh"

int lab_synchronize_after_launch = 1;

// 0 while a GPU timing loop runs the rungs back to back (a synchronize per launch would time the
// host's round trip, not the kernel); 1 otherwise, so a fault surfaces in the call that caused it.
LAB_EXPORT void lab_set_synchronize(int on) { lab_synchronize_after_launch = on; }
