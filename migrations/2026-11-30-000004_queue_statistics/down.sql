ALTER TABLE outbound_queue RESET (
    autovacuum_analyze_threshold, autovacuum_analyze_scale_factor,
    autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor);
ALTER TABLE federation_events RESET (
    autovacuum_analyze_threshold, autovacuum_analyze_scale_factor,
    autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor);
ALTER TABLE delivery_attempts RESET (
    autovacuum_analyze_threshold, autovacuum_analyze_scale_factor,
    autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor);
