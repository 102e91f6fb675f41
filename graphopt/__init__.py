from graphopt.errors import GraphoptError  # noqa
