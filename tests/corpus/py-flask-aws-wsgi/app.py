import awsgi
from flask import Flask, jsonify, request

app = Flask(__name__)


@app.route("/users/<int:user_id>")
def get_user(user_id):
    fields = request.args.get("fields", "").split(",")
    return jsonify(id=user_id, fields=fields, host=request.host)


@app.route("/orders", methods=["POST"])
def create_order():
    order = request.get_json()
    return jsonify(item=order["item"], total=order["quantity"] * order["unit_price"]), 201


def lambda_handler(event, context):
    return awsgi.response(app, event, context)
