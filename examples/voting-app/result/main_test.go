package main

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
)

func TestPercent(t *testing.T) {
	for _, c := range []struct {
		t      tally
		pa, pb int
		name   string
	}{
		{tally{}, 50, 50, "no votes: even"},
		{tally{A: 1, Total: 1}, 100, 0, "one vote"},
		{tally{A: 2, B: 1, Total: 3}, 67, 33, "rounded"},
		{tally{A: 13, B: 8, Total: 21}, 62, 38, "the test's count"},
	} {
		if pa, pb := c.t.percent(c.t.A), c.t.percent(c.t.B); pa != c.pa || pb != c.pb {
			t.Errorf("%s: %+v gives %d%%/%d%%, want %d%%/%d%%", c.name, c.t, pa, pb, c.pa, c.pb)
		}
	}
}

func serve(count func(context.Context) (tally, error), path string) *httptest.ResponseRecorder {
	s := &server{names: ballot.Names{A: "Cats", B: "Dogs"}, pod: "result-1", refresh: 2e9,
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), count: count}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, httptest.NewRequest(http.MethodGet, path, nil))
	return w
}

func TestPageShowsCounts(t *testing.T) {
	w := serve(func(context.Context) (tally, error) { return tally{A: 13, B: 8, Total: 21}, nil }, "/")
	body := w.Body.String()
	for _, want := range []string{`id="count-a">13<`, `id="count-b">8<`, "62%", "38%", `id="total">21 votes<`, `http-equiv="refresh" content="2"`} {
		if !strings.Contains(body, want) {
			t.Errorf("page lacks %q:\n%s", want, body)
		}
	}
	var got tally
	w = serve(func(context.Context) (tally, error) { return tally{A: 13, B: 8, Total: 21}, nil }, "/results.json")
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || got != (tally{13, 8, 21}) {
		t.Errorf("results.json: %s (%v)", w.Body, err)
	}
}

func TestDatabaseDownIsSaid(t *testing.T) {
	down := func(context.Context) (tally, error) { return tally{}, errors.New("dial tcp: connection refused") }
	if w := serve(down, "/"); w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "unreachable") {
		t.Errorf("page with the database down: %d\n%s", w.Code, w.Body)
	}
	if w := serve(down, "/results.json"); w.Code != http.StatusServiceUnavailable || !strings.Contains(w.Body.String(), "refused") {
		t.Errorf("results.json with the database down: %d\n%s", w.Code, w.Body)
	}
}
