"""Federated fine-tuning on Flower: adapters trained where the data lives, averaged on a Flower server.

    aggregate.py    check a device's update, FedAvg's weighted mean (numpy only)
    local.py        a device's round without Flower: global adapter in, E local steps, adapter and token count out
    client_app.py   the Flower ClientApp (`lars_ort.federated.client_app:app`)
    server_app.py   the Flower ServerApp (`lars_ort.federated.server_app:app`): FedAvg / FedProx over adapters,
                    updates checked, the global adapter saved every round as a `lars-ort train` run

client_app and server_app need the `federated` extra (flwr); aggregate and local need only the runtime.
"""
