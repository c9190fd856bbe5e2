// Command worker moves votes from redis to postgres, in place of the
// original's .NET image: it pops each vote from the "votes" list and
// upserts it into the votes table, one row per voter. It waits for redis and
// postgres to be reachable and keeps retrying while they are not, so its
// start order does not matter, as for a Pod.
//
//	worker [-redis redis:6379] [-db postgres://postgres:postgres@db:5432/postgres?sslmode=disable]
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
	"github.com/svcnat/svcnat/examples/voting-app/internal/ballot"
)

func main() {
	var (
		redisAddr = flag.String("redis", ballot.DefaultRedis, "redis address (host:port); the host is a Service name or address")
		dsn       = flag.String("db", ballot.DefaultDB, "postgres URL; the host is a Service name or address")
	)
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rdb := redis.NewClient(&redis.Options{Addr: *redisAddr, DialTimeout: 2 * time.Second})
	defer rdb.Close()
	pool, err := ballot.OpenDB(ctx, *dsn)
	if err != nil {
		log.Error("postgres", "err", err)
		os.Exit(2)
	}
	defer pool.Close()
	log.Info("worker starting", "redis", *redisAddr, "db", ballot.Redact(*dsn))
	w := &worker{q: redisQueue{rdb}, db: pgStore{pool}, log: log, retry: time.Second}
	w.run(ctx)
}

// queue is where votes wait.
type queue interface {
	// pop takes the oldest message, waiting up to wait; nil, nil when
	// none came.
	pop(ctx context.Context, wait time.Duration) ([]byte, error)
	// requeue puts a message back at the head, to be taken first.
	requeue(ctx context.Context, msg []byte) error
}

// store keeps the votes.
type store interface {
	// prepare creates the table if missing; idempotent.
	prepare(ctx context.Context) error
	// save records v, replacing the voter's earlier vote.
	save(ctx context.Context, v ballot.Vote) error
}

type worker struct {
	q     queue
	db    store
	log   *slog.Logger
	retry time.Duration // pause after a failure
}

// run prepares the table, then moves votes until ctx ends. A vote that
// cannot be stored is retried, and put back in the queue if the worker
// stops first, so none is lost; a message that is not a vote is dropped.
func (w *worker) run(ctx context.Context) {
	if !w.until(ctx, "prepare the votes table", func() error { return w.db.prepare(ctx) }) {
		return
	}
	w.log.Info("votes table ready; waiting for votes")
	for ctx.Err() == nil {
		msg, err := w.q.pop(ctx, time.Second)
		if err != nil {
			if ctx.Err() == nil {
				w.log.Warn("pop vote from redis", "err", err)
				sleep(ctx, w.retry)
			}
			continue
		}
		if msg == nil {
			continue
		}
		var v ballot.Vote
		if err := json.Unmarshal(msg, &v); err != nil || v.VoterID == "" || !ballot.Valid(v.Vote) {
			w.log.Error("drop message that is not a vote", "msg", string(msg), "err", err)
			continue
		}
		if w.until(ctx, "store vote", func() error { return w.db.save(ctx, v) }) {
			w.log.Info("vote stored", "voter", v.VoterID, "vote", v.Vote)
			continue
		}
		// Stopping: give the vote back for the next worker.
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		if err := w.q.requeue(rctx, msg); err != nil {
			w.log.Error("put unstored vote back in redis", "voter", v.VoterID, "err", err)
		}
		cancel()
	}
}

// until calls f until it succeeds (true) or ctx ends (false), logging
// the first failure and every change of error.
func (w *worker) until(ctx context.Context, what string, f func() error) bool {
	last := ""
	for {
		err := f()
		if err == nil {
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		if err.Error() != last {
			last = err.Error()
			w.log.Warn(what+"; retrying", "err", err)
		}
		if !sleep(ctx, w.retry) {
			return false
		}
	}
}

// sleep waits d; false if ctx ended first.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

type redisQueue struct{ c *redis.Client }

func (q redisQueue) pop(ctx context.Context, wait time.Duration) ([]byte, error) {
	kv, err := q.c.BLPop(ctx, wait, ballot.Queue).Result()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("blpop %s: %w", ballot.Queue, err)
	}
	return []byte(kv[1]), nil
}

func (q redisQueue) requeue(ctx context.Context, msg []byte) error {
	return q.c.LPush(ctx, ballot.Queue, msg).Err()
}

type pgStore struct{ pool *pgxpool.Pool }

func (s pgStore) prepare(ctx context.Context) error {
	_, err := s.pool.Exec(ctx, ballot.Schema)
	return err
}

func (s pgStore) save(ctx context.Context, v ballot.Vote) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO votes (id, vote) VALUES ($1, $2)
		ON CONFLICT (id) DO UPDATE SET vote = EXCLUDED.vote`, v.VoterID, v.Vote)
	return err
}
