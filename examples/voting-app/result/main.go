// Command result shows the votes counted so far, in place of the original's
// Node.js image: a page on port 80 with each option's count and share,
// read from postgres on every request, which reloads itself every few
// seconds. /results.json gives the same counts to programs.
//
//	result [-listen :80] [-db postgres://...@db:5432/postgres] [-option-a Cats] [-option-b Dogs] [-refresh 2s] [-pod NAME]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
	"github.com/svcnat/svcnat/examples/voting-app/internal/web"
)

func main() {
	var (
		listen  = flag.String("listen", ":80", "address to serve the page on")
		dsn     = flag.String("db", ballot.DefaultDB, "postgres URL; the host is a Service name or address")
		a       = flag.String("option-a", "Cats", "label of the first option")
		b       = flag.String("option-b", "Dogs", "label of the second option")
		refresh = flag.Duration("refresh", 2*time.Second, "how often the page reloads itself")
		pod     = flag.String("pod", web.Hostname(), "pod name shown on the page")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	pool, err := ballot.OpenDB(ctx, *dsn)
	if err != nil {
		log.Error("postgres", "err", err)
		os.Exit(2)
	}
	defer pool.Close()
	s := &server{names: ballot.Names{A: *a, B: *b}, pod: *pod, refresh: *refresh, log: log,
		count: func(ctx context.Context) (tally, error) { return count(ctx, pool) }}
	if err := web.Serve(ctx, *listen, s, log); err != nil {
		log.Error("result", "err", err)
		os.Exit(1)
	}
}

// tally is the count of votes per option; the JSON of /results.json.
type tally struct {
	A     int `json:"a"`
	B     int `json:"b"`
	Total int `json:"total"`
}

// percent returns n's share of the total, rounded, or 50 with no votes
// (the original shows an even split then).
func (t tally) percent(n int) int {
	if t.Total == 0 {
		return 50
	}
	return (200*n + t.Total) / (2 * t.Total)
}

// count reads the tally. Before the worker has made the table there are
// no votes, which is not an error.
func count(ctx context.Context, pool *pgxpool.Pool) (tally, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var t tally
	rows, err := pool.Query(ctx, `SELECT vote, COUNT(id) FROM votes GROUP BY vote`)
	if err == nil {
		for rows.Next() {
			var vote string
			var n int
			if err := rows.Scan(&vote, &n); err != nil {
				rows.Close()
				return tally{}, fmt.Errorf("count votes: %w", err)
			}
			switch vote {
			case "a":
				t.A = n
			case "b":
				t.B = n
			}
		}
		err = rows.Err()
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42P01" { // undefined_table
		return tally{}, nil
	}
	if err != nil {
		return tally{}, fmt.Errorf("count votes: %w", err)
	}
	t.Total = t.A + t.B
	return t, nil
}

type server struct {
	names   ballot.Names
	pod     string
	refresh time.Duration
	log     *slog.Logger
	count   func(context.Context) (tally, error)
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	switch r.URL.Path {
	case "/", "/results.json":
	default:
		http.NotFound(w, r)
		return
	}
	t, err := s.count(r.Context())
	status := http.StatusOK
	if err != nil {
		s.log.Error("read votes from postgres", "err", err)
		status = http.StatusServiceUnavailable
	}
	if r.URL.Path == "/results.json" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		if err != nil {
			_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
			return
		}
		_ = json.NewEncoder(w).Encode(t)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	data := struct {
		Names          ballot.Names
		T              tally
		PctA, PctB     int
		Refresh        int
		Pod            string
		DatabaseFailed bool
	}{s.names, t, t.percent(t.A), t.percent(t.B), max(1, int(s.refresh.Seconds())), s.pod, err != nil}
	if err := page.Execute(w, data); err != nil {
		s.log.Error("render result page", "err", err)
	}
}

var page = template.Must(template.New("result").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{{.Refresh}}">
<title>{{.Names.A}} vs {{.Names.B}} -- Result</title>
<style>
body { font-family: sans-serif; background: #f4f4f8; color: #222; text-align: center; margin: 0; }
h1 { margin: 40px 0 24px; }
.choices { display: flex; justify-content: center; gap: 24px; }
.choice { width: 220px; padding: 24px 0; border-radius: 8px; color: #fff; }
#choice-a { background: #1aaaf8; }
#choice-b { background: #00cbca; }
.label { font-size: 24px; }
.count { font-size: 48px; font-weight: bold; margin: 8px 0; }
.pct { font-size: 20px; }
.bar { display: flex; width: 464px; height: 14px; margin: 24px auto 0; border-radius: 7px; overflow: hidden; }
#total { margin-top: 24px; font-size: 20px; }
#problem { margin-top: 24px; color: #b00; }
footer { margin-top: 48px; color: #888; font-size: 14px; }
</style>
</head>
<body>
<h1>{{.Names.A}} vs {{.Names.B}}: the result</h1>
<div class="choices">
<div class="choice" id="choice-a"><div class="label">{{.Names.A}}</div><div class="count" id="count-a">{{.T.A}}</div><div class="pct">{{.PctA}}%</div></div>
<div class="choice" id="choice-b"><div class="label">{{.Names.B}}</div><div class="count" id="count-b">{{.T.B}}</div><div class="pct">{{.PctB}}%</div></div>
</div>
<div class="bar"><div style="width:{{.PctA}}%;background:#1aaaf8"></div><div style="width:{{.PctB}}%;background:#00cbca"></div></div>
<p id="total">{{.T.Total}} vote{{if ne .T.Total 1}}s{{end}}</p>
{{if .DatabaseFailed}}<p id="problem">The database is unreachable: no counts to show.</p>{{end}}
<footer>Processed by pod {{.Pod}}; this page reloads every {{.Refresh}} s</footer>
</body>
</html>
`))
