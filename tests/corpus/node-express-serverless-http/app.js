const serverless = require('serverless-http');
const express = require('express');

const app = express();
app.use(express.json());

app.get('/users/:id', (req, res) => {
  res.json({ id: req.params.id, fields: String(req.query.fields || '').split(','), host: req.hostname });
});

app.post('/orders', (req, res) => {
  res.status(201).json({ item: req.body.item, total: req.body.quantity * req.body.unit_price });
});

module.exports.handler = serverless(app);
