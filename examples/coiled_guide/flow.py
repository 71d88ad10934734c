"""The example flow from Prefect's Coiled guide: map a task over ten inputs, then use them."""

from prefect import flow, task


@task
def f(n: int) -> int:
    return n**2


@task
def do_something(x: list[int]) -> int:
    print(f"Squares: {x}")
    return sum(x)


@flow(log_prints=True)
def my_flow() -> int:
    print("Hello from your Prefect flow!")
    squares = f.map(range(10))
    return do_something(squares)


if __name__ == "__main__":
    my_flow()
