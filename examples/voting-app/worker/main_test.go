package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
)

// fakeQueue is a list: pop takes from the head, requeue puts back there.
type fakeQueue struct {
	mu   sync.Mutex
	msgs [][]byte
}

func (q *fakeQueue) pop(ctx context.Context, _ time.Duration) ([]byte, error) {
	q.mu.Lock()
	if len(q.msgs) == 0 {
		q.mu.Unlock()
		sleep(ctx, time.Millisecond) // "waited" for a message
		return nil, nil
	}
	m := q.msgs[0]
	q.msgs = q.msgs[1:]
	q.mu.Unlock()
	return m, nil
}

func (q *fakeQueue) requeue(_ context.Context, msg []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.msgs = append([][]byte{msg}, q.msgs...)
	return nil
}

// fakeStore keeps one vote per voter; it fails the first failures calls.
type fakeStore struct {
	mu       sync.Mutex
	votes    map[string]string
	failures int
	saved    chan struct{}
}

func (s *fakeStore) prepare(context.Context) error { return s.fail() }

func (s *fakeStore) fail() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failures > 0 {
		s.failures--
		return errors.New("dial tcp: connection refused")
	}
	return nil
}

func (s *fakeStore) save(_ context.Context, v ballot.Vote) error {
	if err := s.fail(); err != nil {
		return err
	}
	s.mu.Lock()
	s.votes[v.VoterID] = v.Vote
	s.mu.Unlock()
	s.saved <- struct{}{}
	return nil
}

func newWorker(q queue, s store) *worker {
	return &worker{q: q, db: s, log: slog.New(slog.NewTextHandler(io.Discard, nil)), retry: time.Millisecond}
}

func TestVotesReachTheStoreDespiteFailures(t *testing.T) {
	q := &fakeQueue{msgs: [][]byte{
		[]byte(`{"voter_id":"v1","vote":"a"}`),
		[]byte(`not json`),
		[]byte(`{"voter_id":"v2","vote":"c"}`),
		[]byte(`{"voter_id":"v2","vote":"b"}`),
		[]byte(`{"voter_id":"v1","vote":"b"}`),
	}}
	// prepare fails twice, the first save once.
	s := &fakeStore{votes: map[string]string{}, failures: 3, saved: make(chan struct{}, 10)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { newWorker(q, s).run(ctx); close(done) }()
	for range 3 {
		select {
		case <-s.saved:
		case <-time.After(5 * time.Second):
			t.Fatalf("votes not stored; have %v", s.votes)
		}
	}
	cancel()
	<-done
	if len(s.votes) != 2 || s.votes["v1"] != "b" || s.votes["v2"] != "b" {
		t.Errorf("stored %v, want v1:b v2:b (bad messages dropped, the last vote of each voter kept)", s.votes)
	}
}

// blockedStore never succeeds.
type blockedStore struct{ tried chan struct{} }

func (blockedStore) prepare(context.Context) error { return nil }
func (b blockedStore) save(context.Context, ballot.Vote) error {
	select {
	case b.tried <- struct{}{}:
	default:
	}
	return errors.New("database is down")
}

func TestUnstoredVoteGoesBackOnStop(t *testing.T) {
	msg := []byte(`{"voter_id":"v1","vote":"a"}`)
	q := &fakeQueue{msgs: [][]byte{msg}}
	b := blockedStore{tried: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { newWorker(q, b).run(ctx); close(done) }()
	<-b.tried
	cancel()
	<-done
	if len(q.msgs) != 1 || string(q.msgs[0]) != string(msg) {
		t.Errorf("queue after stop: %q, want the unstored vote back", q.msgs)
	}
}
