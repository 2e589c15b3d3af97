"""Routes on JetStream: the route worker, the aggregator, request-reply and route services."""
