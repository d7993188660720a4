//go:build !linux

package egress

import "errors"

func subscribeAddrChanges() (<-chan struct{}, func() error, error) {
	return nil, nil, errors.New("address notifications are only implemented on Linux")
}
