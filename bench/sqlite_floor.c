/* The floor for bench/store_sql.lua: the same upserts of the same JSON records through
 * prepared statements (bind + step), which luasql does not offer, so the string-built SQL
 * the emulator's state store uses can be compared with what SQLite itself costs.
 *
 *   sqlite_floor DB RECORDS_FILE PER_TRANSACTION
 *   RECORDS_FILE: one "id<TAB>json" line per record
 *   prints: insert_us_per_record update_us_per_record
 *
 * bench/store_sql.lua compiles it with cc (needs libsqlite3-dev); it is not part of the emulator. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sqlite3.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int run(sqlite3 *db, const char *sql) {
  char *err = NULL;
  if (sqlite3_exec(db, sql, NULL, NULL, &err) != SQLITE_OK) {
    fprintf(stderr, "%s: %s\n", sql, err ? err : "?");
    sqlite3_free(err);
    return -1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: sqlite_floor DB RECORDS_FILE PER_TRANSACTION\n");
    return 2;
  }
  long per_tx = strtol(argv[3], NULL, 10);
  FILE *f = fopen(argv[2], "rb");
  if (!f || per_tx < 1) return 2;
  size_t cap = 1 << 20, len = 0, n = 0;
  char *data = malloc(cap);
  size_t got;
  while (data && (got = fread(data + len, 1, cap - len, f)) > 0) {
    len += got;
    if (len == cap) data = realloc(data, cap *= 2);
  }
  fclose(f);
  if (!data) return 2;
  for (size_t i = 0; i < len; i++) if (data[i] == '\n') n++;
  char **ids = calloc(n, sizeof *ids), **docs = calloc(n, sizeof *docs);
  if (!ids || !docs) return 2;
  char *p = data;
  for (size_t i = 0; i < n; i++) {
    char *tab = strchr(p, '\t'), *nl = strchr(p, '\n');
    if (!tab || !nl || tab > nl) return 2;
    *tab = '\0';
    *nl = '\0';
    ids[i] = p;
    docs[i] = tab + 1;
    p = nl + 1;
  }
  sqlite3 *db;
  remove(argv[1]);
  if (sqlite3_open(argv[1], &db) != SQLITE_OK) return 1;
  if (run(db, "PRAGMA journal_mode = WAL") || run(db, "PRAGMA synchronous = NORMAL") ||
      run(db, "CREATE TABLE twins(id TEXT PRIMARY KEY, twin TEXT NOT NULL) WITHOUT ROWID"))
    return 1;
  sqlite3_stmt *st;
  if (sqlite3_prepare_v2(db, "INSERT INTO twins(id, twin) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET twin = excluded.twin",
                         -1, &st, NULL) != SQLITE_OK)
    return 1;
  for (int pass = 0; pass < 2; pass++) {
    double t0 = now();
    if (run(db, "BEGIN")) return 1;
    for (size_t i = 0; i < n; i++) {
      sqlite3_bind_text(st, 1, ids[i], -1, SQLITE_STATIC);
      sqlite3_bind_text(st, 2, docs[i], -1, SQLITE_STATIC);
      if (sqlite3_step(st) != SQLITE_DONE) {
        fprintf(stderr, "%s\n", sqlite3_errmsg(db));
        return 1;
      }
      sqlite3_reset(st);
      if ((long)((i + 1) % (size_t)per_tx) == 0 && (run(db, "COMMIT") || run(db, "BEGIN"))) return 1;
    }
    if (run(db, "COMMIT")) return 1;
    printf("%s%.2f", pass ? " " : "", (now() - t0) / (double)n * 1e6);
  }
  printf("\n");
  sqlite3_finalize(st);
  sqlite3_close(db);
  free(ids);
  free(docs);
  free(data);
  return 0;
}
