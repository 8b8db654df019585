#ifndef IOTHUB_CLOCK_H
#define IOTHUB_CLOCK_H

double clock_monotime(void);  /* seconds, CLOCK_MONOTONIC */
double clock_walltime(void);  /* seconds since the Unix epoch, with fraction */
/* UTC "YYYY-MM-DDTHH:MM:SS.mmmZ" (24 chars + NUL). Returns 0, or -1 if out of range. */
int clock_format_iso8601(double epoch, char out[32]);

#endif
