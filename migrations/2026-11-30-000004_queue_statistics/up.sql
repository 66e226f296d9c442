-- The queue tables grow and shrink by tens of thousands of rows within seconds (a peer
-- goes down, comes back), and the planner's row estimates are only as fresh as the last
-- ANALYZE. With statistics taken while outbound_queue was nearly empty, the drain's read
-- of a 100 000-row backlog was planned as a bitmap scan of every waiting row and a sort
-- (11–14 ms a round on average, up to 44 ms) instead of an index range scan in
-- storage order (about 1 ms);
-- see docs/performance.md. Autovacuum analyzes a table once `threshold + scale_factor
-- × rows` rows changed (by default 50 + 10 %, a long wait on a big table); these tables
-- are looked at after 1 000 + 2 % instead. Autovacuum still looks only every
-- `autovacuum_naptime` (docs/operations.md recommends 10 s for parafed's database).
ALTER TABLE outbound_queue SET (
    autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE federation_events SET (
    autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE delivery_attempts SET (
    autovacuum_analyze_threshold = 1000, autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_scale_factor = 0.05);
