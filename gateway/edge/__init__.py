"""The edge gateway process: site config, driver supervision, durable outbox, downlink."""
