// Package ballot holds what the voting app's programs agree on: the vote
// message that vote pushes and worker pops, the redis list carrying it, the
// votes table, and where redis and postgres are found by default.
//
// The defaults name the Services of the example, `redis` and `db`, with the
// credentials of its postgres Pod, as the original images do: the programs
// reach each other through Service names, resolved by the pod's resolver.
package ballot

import (
	"context"
	"fmt"
	"net/url"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// Defaults of the example: its Services' names and ports, and the
// postgres Pod's POSTGRES_USER and POSTGRES_PASSWORD.
const (
	DefaultRedis = "redis:6379"
	DefaultDB    = "postgres://postgres:postgres@db:5432/postgres?sslmode=disable"
)

// Queue is the redis list votes travel through (RPUSH by vote, BLPOP by
// worker).
const Queue = "votes"

// Vote is one vote as it travels through redis, in the original app's
// format.
type Vote struct {
	VoterID string `json:"voter_id"`
	Vote    string `json:"vote"` // "a" or "b"
}

// Names are the labels of the two options, settable by flags.
type Names struct{ A, B string }

// Label returns the label of option o.
func (n Names) Label(o string) string {
	if o == "a" {
		return n.A
	}
	return n.B
}

// Valid reports whether o is one of the options.
func Valid(o string) bool { return o == "a" || o == "b" }

// Schema creates the votes table: one row per voter, whose latest vote
// counts.
const Schema = `CREATE TABLE IF NOT EXISTS votes (
	id   VARCHAR(255) NOT NULL UNIQUE,
	vote VARCHAR(255) NOT NULL
)`

// OpenDB returns a pool of connections to the postgres at dsn, made when
// first needed (so postgres need not be up yet), each within 2 s.
func OpenDB(ctx context.Context, dsn string) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse postgres URL %s: %w", Redact(dsn), err)
	}
	cfg.ConnConfig.ConnectTimeout = 2 * time.Second
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("open postgres pool for %s: %w", Redact(dsn), err)
	}
	return pool, nil
}

// Redact returns a postgres URL with its password hidden, for logs.
func Redact(dsn string) string {
	u, err := url.Parse(dsn)
	if err != nil {
		return fmt.Sprintf("(unparsable postgres URL: %v)", err)
	}
	return u.Redacted()
}
