// Command vote is the voting app's front end, in place of the original's
// Python image: a page with two options on port 80. Each vote goes to redis
// as a JSON message pushed on the "votes" list, where worker picks it up.
// The voter is remembered in a cookie, so a second vote from the same
// browser replaces the first one in the count, as in the original.
//
//	vote [-listen :80] [-redis redis:6379] [-option-a Cats] [-option-b Dogs] [-pod NAME]
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"html/template"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
	"github.com/svcnat/svcnat/examples/voting-app/internal/web"
)

func main() {
	var (
		listen = flag.String("listen", ":80", "address to serve the page on")
		addr   = flag.String("redis", ballot.DefaultRedis, "redis address (host:port); the host is a Service name or address")
		a      = flag.String("option-a", "Cats", "label of the first option")
		b      = flag.String("option-b", "Dogs", "label of the second option")
		pod    = flag.String("pod", web.Hostname(), "pod name shown on the page")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	rdb := redis.NewClient(&redis.Options{Addr: *addr, DialTimeout: 2 * time.Second,
		ReadTimeout: 2 * time.Second, WriteTimeout: 2 * time.Second})
	defer rdb.Close()
	s := &server{
		names: ballot.Names{A: *a, B: *b},
		pod:   *pod,
		log:   log,
		push: func(ctx context.Context, msg []byte) error {
			return rdb.RPush(ctx, ballot.Queue, msg).Err()
		},
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := web.Serve(ctx, *listen, s, log); err != nil {
		log.Error("vote", "err", err)
		os.Exit(1)
	}
}

// voterCookie names the cookie that remembers the voter.
const voterCookie = "voter_id"

type server struct {
	names ballot.Names
	pod   string
	log   *slog.Logger
	// push appends one encoded ballot.Vote to the queue.
	push func(ctx context.Context, msg []byte) error
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/" {
		http.NotFound(w, r)
		return
	}
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		s.render(w, http.StatusOK, "", "")
	case http.MethodPost:
		s.vote(w, r)
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}
}

// vote records the form's vote under the voter's cookie, making one for a
// new voter.
func (s *server) vote(w http.ResponseWriter, r *http.Request) {
	choice := r.FormValue("vote")
	if !ballot.Valid(choice) {
		http.Error(w, fmt.Sprintf("vote %q: want a or b", choice), http.StatusBadRequest)
		return
	}
	voter := ""
	if c, err := r.Cookie(voterCookie); err == nil && c.Value != "" {
		voter = c.Value
	} else {
		b := make([]byte, 8)
		_, _ = rand.Read(b) // never fails (crypto/rand)
		voter = hex.EncodeToString(b)
	}
	msg, err := json.Marshal(ballot.Vote{VoterID: voter, Vote: choice})
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	if err := s.push(r.Context(), msg); err != nil {
		s.log.Error("push vote to redis", "voter", voter, "err", err)
		s.render(w, http.StatusServiceUnavailable, "", "Your vote could not be recorded: redis is unreachable.")
		return
	}
	s.log.Info("vote pushed", "voter", voter, "vote", choice)
	http.SetCookie(w, &http.Cookie{Name: voterCookie, Value: voter, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode})
	s.render(w, http.StatusOK, choice, "")
}

func (s *server) render(w http.ResponseWriter, status int, voted, problem string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	data := struct {
		Names          ballot.Names
		Pod            string
		Voted, Problem string
		VotedLabel     string
	}{s.names, s.pod, voted, problem, s.names.Label(voted)}
	if err := page.Execute(w, data); err != nil {
		s.log.Error("render vote page", "err", err)
	}
}

var page = template.Must(template.New("vote").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{.Names.A}} vs {{.Names.B}}!</title>
<style>
body { font-family: sans-serif; background: #f4f4f8; color: #222; text-align: center; margin: 0; }
h1 { margin: 40px 0 8px; }
p.hint { color: #666; margin: 0 0 32px; }
form { display: flex; justify-content: center; gap: 24px; }
button { font-size: 28px; width: 220px; padding: 28px 0; border: 0; border-radius: 8px; color: #fff; cursor: pointer; }
button#a { background: #1aaaf8; }
button#b { background: #00cbca; }
button.chosen::after { content: " \2713"; }
#voted { margin-top: 28px; font-size: 20px; }
#problem { margin-top: 28px; color: #b00; }
footer { margin-top: 48px; color: #888; font-size: 14px; }
</style>
</head>
<body>
<h1>{{.Names.A}} vs {{.Names.B}}!</h1>
<p class="hint">(Tip: you can change your vote)</p>
<form method="POST" action="/">
<button id="a" name="vote" value="a"{{if eq .Voted "a"}} class="chosen"{{end}}>{{.Names.A}}</button>
<button id="b" name="vote" value="b"{{if eq .Voted "b"}} class="chosen"{{end}}>{{.Names.B}}</button>
</form>
{{if .Voted}}<p id="voted">Thank you for voting: {{.VotedLabel}}</p>{{end}}
{{if .Problem}}<p id="problem">{{.Problem}}</p>{{end}}
<footer>Processed by pod {{.Pod}}</footer>
</body>
</html>
`))
