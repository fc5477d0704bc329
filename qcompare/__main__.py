from qcompare.cli import app

app(prog_name="qcompare")
