DROP INDEX outbound_queue_expiry;
CREATE INDEX outbound_queue_waiting_created ON outbound_queue (created_at)
    WHERE status = 'pending';
