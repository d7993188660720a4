package appliance

import (
	"testing"

	"github.com/vunet/vunet/config"
	"github.com/vunet/vunet/endpoint"
)

// TestMaxQueues: the config's bound on --queues is the endpoint's (config
// does not import the endpoint, so the two constants are kept equal here).
func TestMaxQueues(t *testing.T) {
	if config.MaxQueues != endpoint.MaxQueuePairs {
		t.Fatalf("config.MaxQueues %d, endpoint.MaxQueuePairs %d", config.MaxQueues, endpoint.MaxQueuePairs)
	}
}
