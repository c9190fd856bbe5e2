package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
)

// queue records what the page pushes, or fails.
type queue struct {
	msgs []ballot.Vote
	fail bool
}

func (q *queue) push(_ context.Context, msg []byte) error {
	if q.fail {
		return errors.New("dial tcp: connection refused")
	}
	var v ballot.Vote
	if err := json.Unmarshal(msg, &v); err != nil {
		return err
	}
	q.msgs = append(q.msgs, v)
	return nil
}

func newServer(q *queue) *server {
	return &server{names: ballot.Names{A: "Cats", B: "Dogs"}, pod: "vote-1",
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), push: q.push}
}

func post(s http.Handler, vote string, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(url.Values{"vote": {vote}}.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	for _, c := range cookies {
		r.AddCookie(c)
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

func TestPageOffersBothOptions(t *testing.T) {
	w := httptest.NewRecorder()
	newServer(&queue{}).ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/", nil))
	body := w.Body.String()
	for _, want := range []string{`value="a"`, `>Cats<`, `value="b"`, `>Dogs<`, "pod vote-1"} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q:\n%s", want, body)
		}
	}
	if strings.Contains(body, `id="voted"`) {
		t.Errorf("page thanks for a vote nobody cast")
	}
}

func TestVoteIsPushedAndRemembered(t *testing.T) {
	q := &queue{}
	s := newServer(q)
	w := post(s, "b")
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), "Thank you for voting: Dogs") {
		t.Fatalf("first vote: %d\n%s", w.Code, w.Body)
	}
	cookies := w.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Name != voterCookie || cookies[0].Value == "" {
		t.Fatalf("first vote set cookies %v, want one %s", cookies, voterCookie)
	}
	// The same voter changes their mind; a new voter gets a new id.
	post(s, "a", cookies[0])
	post(s, "a")
	if len(q.msgs) != 3 {
		t.Fatalf("pushed %d votes, want 3: %+v", len(q.msgs), q.msgs)
	}
	if q.msgs[0].VoterID != cookies[0].Value || q.msgs[1].VoterID != cookies[0].Value || q.msgs[1].Vote != "a" {
		t.Errorf("a returning voter was not recognised: %+v", q.msgs)
	}
	if q.msgs[2].VoterID == cookies[0].Value {
		t.Errorf("a new voter got the first voter's id: %+v", q.msgs)
	}
}

func TestBadVoteIsRefused(t *testing.T) {
	q := &queue{}
	if w := post(newServer(q), "c"); w.Code != http.StatusBadRequest {
		t.Errorf("vote c: %d, want 400", w.Code)
	}
	if len(q.msgs) != 0 {
		t.Errorf("pushed %+v for a bad vote", q.msgs)
	}
}

func TestRedisDownIsSaid(t *testing.T) {
	w := post(newServer(&queue{fail: true}), "a")
	if w.Code != http.StatusServiceUnavailable || strings.Contains(w.Body.String(), "Thank you") ||
		!strings.Contains(w.Body.String(), "could not be recorded") {
		t.Errorf("with redis down: %d\n%s", w.Code, w.Body)
	}
	if len(w.Result().Cookies()) != 0 {
		t.Errorf("with redis down the voter was remembered")
	}
}
